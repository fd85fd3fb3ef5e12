# The JSON Schema files in this folder ship inside the package as imgproxy.schemas.
