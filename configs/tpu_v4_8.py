"""music_transformer on a Cloud TPU v4-8 (4 chips, one host): FSDP over the 4 chips.

    midijax compile --config=configs/tpu_v4_8.py --topology=tpu:v4-8   # libtpu, no TPU
    bash launch/tpu_vm.sh --accelerator_type v4-8 --config configs/tpu_v4_8.py ...

The same file serves a v5e-8 (v5litepod-8): 8 chips, one host. Check the fit first (libtpu
compiles for the TPU on any machine): 5.5 GiB of temporaries per device with the scanned,
rematerialized blocks and chunked attention (19.0 GiB before them), compiled in 51 s on the
idle 2-core development machine (191 s while it ran other jobs; README, "Check the fit").
"""
from configs import music_transformer


def get_config():
  config = music_transformer.get_config()
  # All chips of the host on the fsdp axis: parameters and optimizer state are split.
  config.mesh.ici_parallelism = (1, -1, 1)
  config.mesh.dcn_parallelism = (1, 1, 1)
  config.data.batch_size = 64
  return config
