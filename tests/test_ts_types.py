"""The sidebar's TypeScript types (labextension/src/schema.d.ts, which api.ts names its types
after) are the ones openapi-typescript writes from the document a live server publishes: a field
renamed on the server changes them, and then `npm run build` fails where the sidebar uses it."""

import sys
from pathlib import Path

from unavailable import unavailable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import sidebar_types  # noqa: E402


def test_the_checked_in_types_are_generated_from_the_served_document(live_server):
    if not sidebar_types.GENERATOR.exists():
        unavailable("openapi-typescript is not installed: cd labextension && npm install")
    document = live_server.get("mlx/api/openapi.json").json()
    generated = sidebar_types.generate(document)
    assert sidebar_types.TYPES.read_text() == generated, (
        "labextension/src/schema.d.ts is behind the OpenAPI document: run "
        "python scripts/sidebar_types.py, then cd labextension && npm run build")
    assert "ModelDescription: {" in generated and "QueueSnapshot: {" in generated
