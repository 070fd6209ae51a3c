"""Cloud-side code of gpuflow: the cloud layer, which imports nothing from ``gpuflow``.

* :mod:`infra.port` — the provisioner protocol the use cases are written
  against; :mod:`infra.records` its records, :mod:`infra.tags` the
  ``gpuflow:*`` tag names, :mod:`infra.errors` its errors (and the one-line
  error base :mod:`gpuflow.errors` re-exports), :mod:`infra.common` the small
  local helpers (names, atomic writes, pids) gpuflow shares.
* :mod:`infra.aws` — EC2/SSM clients with retries (the only boto3 importer),
  and the provisioner: account set-up (:mod:`~infra.aws.config`), images
  (:mod:`~infra.aws.image`), instances (:mod:`~infra.aws.instance`).
* :mod:`infra.sandbox` — the moto-backed sandbox cloud.
* :mod:`infra.userdata` and ``infra/assets`` — what runs on the instance (the
  dead-man's switch); :mod:`infra.dlami` — which AMI.
* ``infra/prices.json`` — dated on-demand price table; ``infra/iam-policy.json``
  — the least-privilege policy gpuflow needs.

Nothing under ``infra.aws`` or ``infra.sandbox`` is imported when the CLI
starts: gpuflow's cloud port (:mod:`gpuflow.provisioner`) imports them inside
the factory that opens them.
"""
