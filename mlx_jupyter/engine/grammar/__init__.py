"""Constrained decoding and tool-call syntax.

- `constraints`: what a request's output must be (a JSON value valid for a schema; calls of
  given functions in the model family's tool-call syntax), as an llguidance grammar; the server
  checks a request's schemas with it before anything is queued, the worker compiles it.
- `syntax`: the model families' markers (tool calls, thinking) and the router that splits an
  answer's text into its text, its thinking and its tool calls as it streams.
- `processor`: the worker's logits processor that masks every token the grammar forbids
  (imports mlx: the worker's only).
"""
