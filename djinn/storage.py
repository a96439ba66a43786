"""Atomic result storage on a local directory or under an S3 prefix.

Writes never leave half a file: locally a temp file is hard-linked into place, on S3
a single PUT is atomic. ``overwrite=False`` refuses to replace an existing key, atomically:
locally the link fails if the name exists, on S3 the PUT carries ``If-None-Match: *``.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Optional, Protocol


class Store(Protocol):
    uri: str

    def put_bytes(self, key: str, data: bytes, overwrite: bool = False) -> str: ...
    def get_bytes(self, key: str) -> bytes: ...
    def list(self, prefix: str = "", limit: Optional[int] = None) -> list[str]: ...


class KeyExists(FileExistsError):
    pass


class LocalStore:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.uri = str(self.root)

    def put_bytes(self, key: str, data: bytes, overwrite: bool = False) -> str:
        path = self.root / key
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            if overwrite:
                os.replace(tmp, path)
            else:
                try:
                    os.link(tmp, path)  # fails if the key exists: never replaces another run's file
                except FileExistsError:
                    raise KeyExists(f"{path} exists; refusing to overwrite it") from None
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return str(path)

    def get_bytes(self, key: str) -> bytes:
        return (self.root / key).read_bytes()

    def list(self, prefix: str = "", limit: Optional[int] = None) -> list[str]:
        if not self.root.exists():
            return []
        keys = (p.relative_to(self.root).as_posix() for p in self.root.rglob("*") if p.is_file())
        return sorted(k for k in keys if k.startswith(prefix) and not Path(k).name.startswith("."))[:limit]


class S3Store:
    def __init__(self, uri: str, endpoint_url: Optional[str] = None, region: Optional[str] = None,
                 connect_timeout: float = 60, read_timeout: float = 60, attempts: int = 5):
        import boto3
        from botocore.config import Config

        self.uri = uri.rstrip("/")
        self.bucket, _, prefix = uri[len("s3://"):].partition("/")
        self.prefix = prefix.strip("/")
        endpoint_url = endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or None
        config = Config(s3={"addressing_style": "path"} if endpoint_url else {}, retries={"max_attempts": attempts},
                        connect_timeout=connect_timeout, read_timeout=read_timeout)
        self.client = boto3.client("s3", endpoint_url=endpoint_url, region_name=region, config=config)

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def put_bytes(self, key: str, data: bytes, overwrite: bool = False) -> str:
        full = self._key(key)
        ctype = "application/json" if key.endswith(".json") else "application/octet-stream"
        # a conditional PUT: S3 itself refuses an existing key, so two writers cannot both win
        cond = {} if overwrite else {"IfNoneMatch": "*"}
        try:
            self.client.put_object(Bucket=self.bucket, Key=full, Body=data, ContentType=ctype, **cond)
        except self.client.exceptions.ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("PreconditionFailed", "ConditionalRequestConflict"):
                raise KeyExists(f"s3://{self.bucket}/{full} exists; refusing to overwrite it") from None
            raise
        return f"s3://{self.bucket}/{full}"

    def get_bytes(self, key: str) -> bytes:
        return self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read()

    def list(self, prefix: str = "", limit: Optional[int] = None) -> list[str]:
        keys: list[str] = []
        base = self._key("")
        for page in self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=self._key(prefix), PaginationConfig={"MaxItems": limit}):
            keys += [o["Key"][len(base):] for o in page.get("Contents", [])]
        return sorted(keys)


def open_store(uri: str, endpoint_url: Optional[str] = None, region: Optional[str] = None, **s3: float) -> Store:
    """A store for a local directory or ``s3://bucket/prefix`` (``s3``: S3Store's timeouts and attempts)."""
    if uri.startswith("s3://"):
        return S3Store(uri, endpoint_url, region, **s3)
    return LocalStore(uri)


def put_json(store: Store, key: str, obj, overwrite: bool = False) -> str:
    """Serialize ``obj`` (a pydantic model or plain data) and store it atomically."""
    text = obj.model_dump_json(indent=2) if hasattr(obj, "model_dump_json") else json.dumps(obj, indent=2)
    return store.put_bytes(key, text.encode(), overwrite=overwrite)
