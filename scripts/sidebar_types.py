"""Writes the sidebar's TypeScript types, labextension/src/schema.d.ts, from the OpenAPI document
(openapi-typescript, a dev dependency of the labextension: `cd labextension && npm install`).

Run it after changing an answer's contract (mlx_jupyter/contracts), then `npm run build`: api.ts
names its types after the generated ones, so a renamed field fails the build, not the user.
tests/test_ts_types.py fails while the file is behind the document a live server publishes.

    python scripts/sidebar_types.py
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LABEXTENSION = ROOT / "labextension"
TYPES = LABEXTENSION / "src" / "schema.d.ts"
GENERATOR = LABEXTENSION / "node_modules" / ".bin" / "openapi-typescript"


def generate(document: dict) -> str:
    """The TypeScript of a document, as openapi-typescript writes it."""
    with tempfile.TemporaryDirectory() as folder:
        source, target = Path(folder) / "openapi.json", Path(folder) / "schema.d.ts"
        source.write_text(json.dumps(document))
        subprocess.run([str(GENERATOR), str(source), "--output", str(target)], check=True,
                       capture_output=True, cwd=LABEXTENSION)
        return target.read_text()


def main() -> None:
    sys.path.insert(0, str(ROOT))
    from mlx_jupyter.api.routes import openapi_document

    TYPES.write_text(generate(openapi_document("/")))
    print(f"wrote {TYPES.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
