"""A JSONResponse rendered with orjson (issue 16: the hot route's response JSON).

The bytes are those of Starlette's JSONResponse (compact separators, UTF-8, no ASCII escaping) except two
corners: a float written with a two-digit exponent by Python (1e-07) keeps orjson's shortest form (1e-7), and
NaN or an infinity becomes null (Starlette refuses them with a 500). Whatever orjson cannot serialize (integers
beyond 64 bits, keys that are not strings, lone surrogates) is rendered by Starlette's own code instead.
"""

from __future__ import annotations

from typing import Any

import orjson
from fastapi.responses import JSONResponse


class FastJSONResponse(JSONResponse):
    def render(self, content: Any) -> bytes:
        try:
            return orjson.dumps(content)
        except (orjson.JSONEncodeError, TypeError):
            return super().render(content)
