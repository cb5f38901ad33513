"""Small-scale image experiment on scikit-learn's handwritten digits, entirely through the ``t2i`` code path.

* :mod:`digits.data` -- the 8x8 digits (in the sklearn wheel, no download), a fixed stratified train/test
  split, prompts ``"a handwritten digit k"``.
* :mod:`digits.pretrain` -- a prompt-conditioned pixel-space diffusion model (diffusers UNet2DConditionModel
  + a tiny CLIP text encoder trained jointly), saved with ``save_pretrained`` into a content-hashed cache
  folder and reused.
* :mod:`digits.rewards` -- a small CNN digit classifier trained on the training split only (reward: the
  probability of the prompted digit), JPEG compressibility, and classifier-feature metrics (accuracy,
  Frechet distance, diversity).
* :mod:`digits.evaluate` -- metrics of a policy on fixed prompts and noise (reward, path KL, accuracy, FD,
  diversity, other solvers), each with its standard error.
* :mod:`digits.experiment` -- fine-tuning with ``sa_ac``, ``ddpo_sf``, ``ddpo_is`` and ``dpok`` through
  :func:`t2i.trainer.make_trainer`; metrics, figures, benchmark table. ``python -m digits.experiment [--quick]``.
"""
