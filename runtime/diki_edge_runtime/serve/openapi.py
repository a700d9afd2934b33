"""The OpenAPI 3.1 schema of ``diki-edge serve`` (``GET /openapi.json``), written out by hand: the endpoints are
few and their names are a contract clients rely on, so the schema is kept beside them rather than generated."""

from __future__ import annotations

from typing import Any

from diki_edge_runtime.serve.settings import MAX_TOP_K, ServeSettings

ERROR = {"type": "object", "required": ["error"], "properties": {"error": {
    "type": "object", "required": ["kind", "message"],
    "properties": {"kind": {"type": "string"}, "message": {"type": "string"}}}}}
RESULT = {"type": "object", "description": "exactly one line of `diki-edge predict --json` (schema 2)",
          "required": ["input", "ok", "task", "task_index", "weight", "top_k", "image_embeds", "frozen_embeds",
                       "error"],
          "properties": {
              "input": {"type": "string", "description": "the uploaded file name"},
              "ok": {"type": "boolean"},
              "task": {"type": ["string", "null"]},
              "task_index": {"type": ["integer", "null"]},
              "weight": {"type": ["number", "null"], "minimum": 0, "maximum": 1},
              "top_k": {"type": "array", "items": {"type": "object", "properties": {
                  "class": {"type": "string"}, "probability": {"type": "number"}}}},
              "image_embeds": {"type": ["array", "null"], "items": {"type": "number"}},
              "frozen_embeds": {"type": ["array", "null"], "items": {"type": "number"}},
              "error": {"oneOf": [{"type": "null"}, {"type": "object", "properties": {
                  "kind": {"type": "string"}, "message": {"type": "string"}}}]}}}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(*codes: int) -> dict[str, Any]:
    words = {400: "malformed request", 401: "missing or wrong API key", 413: "body or part over a limit",
             415: "wrong content type", 422: "bank refused (the old one stays)", 503: "queue full (Retry-After)"}
    return {str(c): _json(ERROR, words[c]) for c in codes}


def openapi_schema(settings: ServeSettings) -> dict[str, Any]:
    secured = [{"bearer": []}] if settings.api_key else []
    predict_form = {"type": "object", "required": ["image"], "properties": {
        "image": {"type": "array", "items": {"type": "string", "format": "binary"}, "maxItems": settings.max_images},
        "top_k": {"type": "integer", "minimum": 1, "maximum": MAX_TOP_K, "default": settings.top_k},
        "labels": {"type": "array", "items": {"type": "string"},
                   "description": "comma-separated, or the field repeated"},
        "template": {"type": "string", "description": "prompt template for the labels; {} is the label"},
        "embeddings": {"type": "boolean", "default": False}}}
    embed_body = {"type": "object", "required": ["texts"], "properties": {
        "texts": {"type": "array", "items": {"type": "string"}},
        "task": {"type": ["string", "integer", "null"], "default": None},
        "weight": {"oneOf": [{"type": "number"}, {"type": "array", "items": {"type": "number"}}], "default": 0.0}}}

    def op(summary: str, responses: dict[str, Any], body: dict[str, Any] | None = None,
           security: list | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {"summary": summary, "responses": responses,
                               "security": secured if security is None else security}
        if body:
            out["requestBody"] = body
        return out

    any_object = {"type": "object"}
    paths = {
        "/v1/predict": {"post": op(
            "Task, familiarity M and top-k classes (or labels) for each uploaded image",
            {"200": _json({"type": "object", "properties": {"schema": {"const": 2},
                                                            "results": {"type": "array", "items": RESULT}}},
                          "one result per image, in order; a bad image is its own error object"),
             **_errors(400, 401, 413, 415, 503)},
            {"required": True, "content": {"multipart/form-data": {"schema": predict_form}}})},
        "/v1/embed/text": {"post": op(
            "L2-normalised text embeddings (frozen, or under a task's text adapter at M = weight)",
            {"200": _json({"type": "object", "properties": {"embeddings": {
                "type": "array", "items": {"type": "array", "items": {"type": "number"}}}}}, "[N, D] embeddings"),
             **_errors(400, 401, 413, 415)},
            {"required": True, "content": {"application/json": {"schema": embed_body}}})},
        "/v1/admin/reload": {"post": op("Re-read the bank file the server was started with; swap atomically",
                                        {"200": _json(any_object, "the new bank's tasks"), **_errors(401, 422)})},
        "/v1/info": {"get": op("Predictor.info() and the bank's tasks", {"200": _json(any_object, "info")})},
        "/healthz": {"get": op("The process is alive", {"200": _json(any_object, "ok")}, security=[])},
        "/readyz": {"get": op("The model is loaded and a prediction ran",
                              {"200": _json(any_object, "ready"), "503": _json(ERROR, "not ready")})},
        "/metrics": {"get": op("Prometheus text format", {"200": {"description": "metrics",
                                                                  "content": {"text/plain": {}}}})},
    }
    return {"openapi": "3.1.0", "info": {"title": "diki-edge serve", "version": "1"}, "paths": paths,
            "components": {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}}}
