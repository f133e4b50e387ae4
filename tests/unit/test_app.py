"""The app's OpenAPI document, built without an engine: client generators need one operation
id per operation."""

import warnings
from collections import Counter

from server.app import create_app


def test_every_operation_has_its_own_id():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # FastAPI warns on a duplicate id and keeps both
        document = create_app(engine=None).openapi()
    ids = Counter(operation["operationId"] for path in document["paths"].values()
                  for operation in path.values())
    assert [name for name, count in ids.items() if count > 1] == []
    assert {"get", "post"} <= set(document["paths"]["/ping"])
