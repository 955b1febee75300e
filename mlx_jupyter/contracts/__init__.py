"""The shapes of what the server answers, as pydantic models: handlers render them, the OpenAPI
document publishes their schemas, the sidebar's TypeScript types are checked against them.

Pydantic only: every layer may import these (the kernel side reads the same shapes).
"""
