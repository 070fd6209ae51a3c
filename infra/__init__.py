"""Cloud-side code of gpuflow: the only package that imports boto3 (in ``infra.aws``).

* :mod:`infra.aws` — EC2/SSM clients with retries, and the provisioner that
  launches, describes and deletes what gpuflow creates.
* :mod:`infra.userdata` and ``infra/assets`` — what runs on the instance (the
  dead-man's switch).
* :mod:`infra.sandbox` — the moto-backed sandbox cloud.
* ``infra/prices.json`` — dated on-demand price table; ``infra/iam-policy.json``
  — the least-privilege policy gpuflow needs.

Nothing here is imported when the CLI starts: the use cases in ``gpuflow/``
import these modules inside the functions that need them.
"""
