"""Python client of the LoRP depth-pruning service.

    from lorp_client import Client

    with Client("http://127.0.0.1:8000", api_key=None) as lorp:
        job = lorp.submit(model="demo", num_layers=4, method="auto")
        job = lorp.wait(job.id, on_progress=lambda j: print(j.stage, j.progress))
        lorp.download(job.id, "pruned/")  # pruned/model is a Hugging Face model folder

``Client()`` without arguments reads the service and key from ``$LORP_URL`` and ``$LORP_API_KEY``.
Needs only httpx and pydantic; the models are the ones the API serves (``lorp_client.models``).
"""

from lorp_client.aio import AsyncClient
from lorp_client.client import Client
from lorp_client.errors import ApiError, DownloadError, LorpError, ServiceUnreachable, WaitTimeout
from lorp_client.models import ArtifactOut, DatasetOut, JobListItem, JobOut, JobStatus, JobSummary

__all__ = [
    "ApiError",
    "ArtifactOut",
    "AsyncClient",
    "Client",
    "DatasetOut",
    "DownloadError",
    "JobListItem",
    "JobOut",
    "JobStatus",
    "JobSummary",
    "LorpError",
    "ServiceUnreachable",
    "WaitTimeout",
]
