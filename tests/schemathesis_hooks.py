"""Schemathesis hooks (SCHEMATHESIS_HOOKS=schemathesis_hooks): how to read an NDJSON answer,
so that a stream's events are checked against the document like any other answer."""

import json

import schemathesis


@schemathesis.deserializer("application/x-ndjson")
def ndjson(_context, response):
    return [json.loads(line) for line in response.content.decode().splitlines() if line]
