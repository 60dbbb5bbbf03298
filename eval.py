"""Evaluate a colorizer.

  python eval.py --workdir DIR [--step N | --best] [--inception F] [--config.x=y ...]
  python eval.py --workdir DIR --folder photos/ [--out DIR]
  python eval.py --variables disco.msgpack --config configs/disco.py --out eval_official/ \
      [--config.input.dataset=folder --config.input.folder=photos/]

With --workdir: restores the latest checkpoint of DIR (or step N, or the best by validation loss)
with the config saved there; `--config.x=y` changes that config (dataset, split, batch, data_dir).
With --variables: weights converted from an official checkpoint (`disco-convert`), or the official
.pth/.pth.tar itself, with the model and data of --config. `--folder` evaluates a folder of colour
photos instead of the config's split. Either way it colorizes the evaluation images automatically
and writes metrics.json (PSNR, SSIM, colorfulness and its gap to the ground truth, FID when
--inception names the converted pytorch-fid weights, LPIPS when --lpips names the converted
AlexNet weights), TensorBoard scalars and side-by-side PNGs
(gray | ours | truth) to DIR/eval or --out (a gs:// path works). Installed: `disco-eval`.
"""
from disco_jax import cli

if __name__ == '__main__':
  cli.evaluate()
