"""JSON that others wrote (a registry's answers, a token server's, an S3 object, a layer's
TOC): any garbage is a ValueError, as a body that is no JSON is.

Python's parser raises RecursionError for arrays nested past its depth (`[` 5,000 times),
which no caller of json.loads expects: each would end as an unexpected error (a traceback,
EIO) instead of the source's garbage. Manifests have their own reader (manifest_format).
"""

from __future__ import annotations

import json
from typing import Any


def loads(data: bytes | str) -> Any:
    try:
        return json.loads(data)
    except RecursionError:
        raise ValueError("JSON nested too deep") from None
