"""OpenAI-compatible endpoints: /v1/completions, /v1/chat/completions and /v1/models.

A front end over the same `Backend.generate` as Generate: an OpenAI request becomes a
GenerateRequest (bodies.py), its Completions become OpenAI responses (responses.py), so samples,
logprobs and weight versions are exactly Generate's, on the single-process server and on Ray Serve
alike. vLLM's own OpenAI layer supplies the request and response models, chat-template rendering
and the tool-call parsers (chat.py); routes.py serves them.
"""
