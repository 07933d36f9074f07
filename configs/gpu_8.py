"""music_transformer on the 8 GPUs of one host: data parallel over all 8 (the model's 25 M
parameters fit on every GPU, so replicating them is the simplest fast layout).

    midijax compile --config=configs/gpu_8.py --topology=local     # on the GPU host
    bash launch/multi_gpu.sh --config configs/gpu_8.py --workdir /scratch/mt

Expect: `midijax compile` says whether the step fits each GPU's memory; tokens/s on GPUs
have not been measured.
"""
from configs import music_transformer


def get_config():
  config = music_transformer.get_config()
  config.mesh.ici_parallelism = (-1, 1, 1)
  config.mesh.dcn_parallelism = (1, 1, 1)
  config.data.batch_size = 64
  return config
