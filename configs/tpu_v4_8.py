"""music_transformer on a Cloud TPU v4-8 (4 chips, one host): FSDP over the 4 chips.

    midijax compile --config=configs/tpu_v4_8.py --topology=tpu:v4-8   # libtpu, no TPU
    bash launch/tpu_vm.sh --accelerator_type v4-8 --config configs/tpu_v4_8.py ...

The same file serves a v5e-8 (v5litepod-8): 8 chips, one host.

Expect: `midijax compile` prints "fits" for tpu:v4-8 and exits 0, with the memory per chip
and FLOPs of the step (the README's accelerator section gives the measured figures). No
training run on a TPU has been measured.
"""
from configs import music_transformer


def get_config():
  config = music_transformer.get_config()
  # All chips of the host on the fsdp axis: parameters and optimizer state are split.
  config.mesh.ici_parallelism = (1, -1, 1)
  config.mesh.dcn_parallelism = (1, 1, 1)
  config.data.batch_size = 64
  return config
