"""HTTP layer: route table, thin handlers and pydantic schemas."""
