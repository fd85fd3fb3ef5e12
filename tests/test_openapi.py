"""schemas/openapi.yaml describes exactly the routes the server has."""

from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


async def test_openapi_document_lists_every_route(client):
    document = yaml.safe_load((REPO / "schemas" / "openapi.yaml").read_text())
    served = {
        (route.method, route.resource.canonical)
        for route in client.app.router.routes()
        if route.method != "HEAD"  # aiohttp adds HEAD beside each GET
    }
    documented = {(method.upper(), path) for path, operations in document["paths"].items() for method in operations}
    assert served == documented
    body = document["paths"]["/v1/images/generations"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert (REPO / "schemas" / body["$ref"]).is_file()
