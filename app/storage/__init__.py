"""Object storage for artifacts and uploaded datasets: one interface, a local folder and S3.

- ``keys``: the key rules both backends apply; ``base``: the interface, objects and errors;
- ``local``: files under a root folder; ``s3``: any S3-compatible store (boto3 imported lazily);
- ``factory``: a store from its URL; the artifact store and a model folder's store from the settings.
"""

from app.storage.base import CHUNK_SIZE, ObjectNotFound, Storage, StorageError, StoredObject
from app.storage.factory import artifact_store, model_folder_store, storage_from_url
from app.storage.keys import MAX_KEY_LENGTH, validate_key
from app.storage.local import LocalStorage
from app.storage.s3 import S3Storage

__all__ = [
    "CHUNK_SIZE",
    "MAX_KEY_LENGTH",
    "LocalStorage",
    "ObjectNotFound",
    "S3Storage",
    "Storage",
    "StorageError",
    "StoredObject",
    "artifact_store",
    "model_folder_store",
    "storage_from_url",
    "validate_key",
]
