"""Uploaded files (`/v1/files`): where their bytes are kept (`storage`: a local directory, or `s3`), the JSONL
check an upload passes through (`jsonl`), the per-line batch request validator (`batch_lines`) and the service
that ties storage to the metadata in SQL (`service`). Nothing here knows HTTP or multipart.
"""
