"""Every body the daemon takes or sends, as pydantic models, one module per surface.

- ``openai``: the OpenAI requests, responses, stream chunks, model list, error envelope
- ``embeddings``: the OpenAI embeddings request and response
- ``native``: the pandas-records ``/infer`` rows
- ``edge``: ``/pipelines``, ``/models``, ``/healthz``, ``/readyz``, and the paths themselves
- ``logs``: the inference log record and the ``/logs`` page

The routes serialise these models and the OpenAPI document is generated from them,
so the two cannot disagree.
"""
