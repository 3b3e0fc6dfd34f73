"""Container image formats: OCI layouts and archives, Docker archives, skopeo ``dir:`` folders."""
