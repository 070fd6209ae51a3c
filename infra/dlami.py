"""Where the AWS Deep Learning AMI with TensorFlow is looked up: one place.

The provisioner (``infra/aws``) resolves the AMI through these names, and the
sandbox (``infra/sandbox.py``) seeds exactly these names into moto, so the two
cannot drift apart.

AWS publishes each DLAMI's latest id as a public SSM parameter
``/aws/service/deeplearning/ami/<arch>/<ami_type>/latest/ami-id`` where
``ami_type`` is the AMI's name without the words "Deep Learning AMI",
lower-cased and hyphenated (AWS DLAMI developer guide, "Finding the ID of a
DLAMI").  The TensorFlow DLAMI was last published for TensorFlow 2.16 on Ubuntu
22.04; the base OSS-driver DLAMI is the fallback when that parameter is absent
in a region (the provisioner then installs TensorFlow into a virtualenv).
"""

from __future__ import annotations

# Amazon's image-publishing account (owner of every DLAMI).
DLAMI_OWNER_ID = "898082745236"
DLAMI_OWNER_ALIAS = "amazon"

# Preferred first: the TensorFlow DLAMI, then the base DLAMI with the same driver.
DLAMI_SSM_PARAMETER = "/aws/service/deeplearning/ami/x86_64/oss-nvidia-driver-gpu-tensorflow-2.16-ubuntu-22.04/latest/ami-id"
DLAMI_BASE_SSM_PARAMETER = "/aws/service/deeplearning/ami/x86_64/base-oss-nvidia-driver-ubuntu-22.04/latest/ami-id"
DLAMI_SSM_PARAMETERS: tuple[str, ...] = (DLAMI_SSM_PARAMETER, DLAMI_BASE_SSM_PARAMETER)

# describe_images fallback: Name filter (EC2 wildcard syntax) with Owners=[DLAMI_OWNER_ID];
# pick the newest CreationDate among the matches.
DLAMI_NAME_PATTERN = "Deep Learning OSS Nvidia Driver AMI GPU TensorFlow * (Ubuntu 22.04) *"

# The name the sandbox gives its seeded image (matches DLAMI_NAME_PATTERN).
DLAMI_SANDBOX_IMAGE_NAME = "Deep Learning OSS Nvidia Driver AMI GPU TensorFlow 2.16 (Ubuntu 22.04) 20240701"

# The login user of the Ubuntu-based DLAMIs.
DLAMI_SSH_USER = "ubuntu"
