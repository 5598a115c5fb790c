"""Model repositories to and from object storage (S3 and S3-compatible endpoints, through boto3).

`push` uploads a model folder's artifacts by sha256 and its manifest last; `pull` downloads into a
temporary folder beside the repository, verifies every file against the manifest while writing it,
and renames the folder into place, so a reader never sees a half repository (docs/deploy.md).

Torch-free on purpose: the init container of every serving pod runs `gendr-build pull` from the serving
image, which has no torch. May import `engine_build` (top level: errors) and `service` (the manifest)
only; boto3 is imported when a client is made (the `storage` extra).
"""
