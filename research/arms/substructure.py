"""The arms of the `substructure` question (docs/substructure.md): which ViT and which MAE
recipe see the substructure. Each arm is one or more ordinary `main.py` runs, run by
research/run.py:

  python research/run.py research/arms/substructure.py --list
  python research/run.py research/arms/substructure.py --run sup_vit_p8 sup_cnn
  python research/run.py research/arms/substructure.py --table

`get_arms()` returns {name: run}; a run is a dict: `config` (a config file and its
argument), `overrides` (`--config.KEY=VALUE` flags; `{root}` stands for the runs' root),
the `question` it answers, what it should show (`expect`, written before it ran) and the
runs it `needs` finished first (the pretraining a probe starts from).
"""

from __future__ import annotations

from typing import Any

SUB = ("--config.data.sim.variant=substructure",)
SCRATCH = ("--config.init_from=",)
FLIPS = ("--config.augment=True", "--config.data.augment.max_shift=0")


# The loss on every patch's high-pass part (normalised per patch): the recipe whose frozen
# features first saw substructure, the demo default since.
VISIBLE_HP = ("--config.loss.masked_only=False", "--config.loss.type=mse",
              "--config.loss.norm_pix=True", "--config.loss.target=highpass")
# The demo recipe before it (BCE on the removed patches' pixels): the `base` arm, and the
# arms that change one thing of it.
BASE = ("--config.loss.masked_only=True", "--config.loss.type=bce",
        "--config.loss.norm_pix=False", "--config.loss.target=pixels")


def _lr(rate: float) -> str:
  return f"--config.optim.lr_groups=(('.*', {rate}),)"


def _run(config: str, overrides: tuple[str, ...], question: str, expect: str = "",
         needs: tuple[str, ...] = ()) -> dict[str, Any]:
  return {"config": config, "overrides": overrides, "question": question, "expect": expect,
          "needs": needs}


def _supervised(*extra: str, epochs: int = 40, lr: float = 1e-3, expect: str = "",
                cnn: bool = False) -> dict[str, Any]:
  """A network from scratch on every label: the ViT, or with `cnn` the small CNN."""
  if cnn:
    return _run("configs/finetune.py:demo,arch=cnn",
               (*SUB, _lr(lr), f"--config.epochs={epochs}", *extra), "architecture", expect)
  return _run("configs/finetune.py:demo", (*SUB, *SCRATCH, _lr(lr), f"--config.epochs={epochs}",
                                          *extra), "architecture", expect)


def _mae_arm(name: str, pretrain: tuple[str, ...], model: tuple[str, ...] = (),
             expect: str = "", pool: str = "") -> dict[str, dict[str, Any]]:
  """An MAE recipe arm: one unlabelled pretraining on the `substructure` pool (every class;
  `pool`: another folder, e.g. a larger one), then the encoder scored three ways on the
  demo folder's labels: the probe (frozen features, block chosen on validation), a
  partial fine-tune (the last block and the head, every label) and the full fine-tune
  at 300 labels per class and on every label. The fine-tunes use the scratch ViT's recipe
  (lr 1e-3 for every param, 40 epochs), so only the initialisation differs; `ftdef` is
  the every-label fine-tune at the demo fine-tune's own rates."""
  pre = f"mae_{name}_pre"
  source = (f"--config.init_from={{root}}/{pre}",)
  data = ("--config.data.dir=data/substructure_sim_demo",)
  pool_dir = (f"--config.data.dir={pool}", "--config.data.sim.per_class=30000") if pool else ()
  question = f"mae:{name}"
  return {
      pre: _run("configs/pretrain.py:demo", (*SUB, *pool_dir, *model, *pretrain), question, expect),
      f"mae_{name}_probe": _run("configs/probe.py:demo", (*SUB, *data, *model, *source), question,
                               needs=(pre,)),
      # The probe's head trained 10x longer (the frozen features are computed once, so
      # its epochs are cheap): the 20-epoch probe was still rising.
      f"mae_{name}_probe200": _run("configs/probe.py:demo",
                                  (*SUB, *data, *model, *source, "--config.epochs=200"),
                                  question, needs=(pre,)),
      f"mae_{name}_partial": _run("configs/finetune.py:demo",
                                 (*SUB, *data, *model, *source, _lr(1e-3), "--config.epochs=40",
                                  "--config.trainable_blocks=1"), question, needs=(pre,)),
      f"mae_{name}_ft300": _run("configs/finetune.py:demo",
                               (*SUB, *data, *model, *source, _lr(1e-3), "--config.epochs=120",
                                "--config.labels_per_class=300"), question, needs=(pre,)),
      f"mae_{name}_ftall": _run("configs/finetune.py:demo",
                               (*SUB, *data, *model, *source, _lr(1e-3), "--config.epochs=40"),
                               question, needs=(pre,)),
      # The demo fine-tune's own rates (encoder 1e-4, head 1e-3): the MAE's features kept
      # closer to where pretraining left them.
      f"mae_{name}_ftdef": _run("configs/finetune.py:demo",
                               (*SUB, *data, *model, *source, "--config.epochs=40"),
                               question, needs=(pre,)),
      # Twice as long: every fine-tune was still rising at epoch 40.
      f"mae_{name}_ftdef80": _run("configs/finetune.py:demo",
                                 (*SUB, *data, *model, *source, "--config.epochs=80"),
                                 question, needs=(pre,)),
      # At 300 labels per class (120 epochs of 14 steps: half the steps of `ftdef`).
      f"mae_{name}_ft300def": _run("configs/finetune.py:demo",
                                  (*SUB, *data, *model, *source, "--config.epochs=120",
                                   "--config.labels_per_class=300"), question, needs=(pre,)),
  }


def get_arms() -> dict[str, dict[str, Any]]:
  return dict(_ARMS)


_ARMS = {
    # (1) Which network learns substructure from every label (5,400 images), from scratch.
    "sup_vit_p8": _supervised(
        expect="at chance for several epochs, then a slow climb (the 6,000-per-class hint)"),
    "sup_vit_p8_flips": _supervised(
        *FLIPS, expect="flips and quarter turns are label-preserving here: more data, higher"),
    "sup_vit_p8_conv": _supervised(
        "--config.model.stem=conv",
        expect="local non-linear features per patch: leaves chance sooner than p8"),
    "sup_vit_p8_conv_flips": _supervised("--config.model.stem=conv", *FLIPS),
    "sup_vit_p4": _supervised("--config.model.patch=4",
                              expect="finer tokens: sees few-pixel detail, 4x the tokens"),
    "sup_cnn": _supervised(cnn=True, expect="the ceiling: 0.81 at 10 epochs"),
    "sup_cnn_flips": _supervised(*FLIPS, cnn=True),
    "sup_vit_p8_mean": _supervised("--config.model.pool=mean",
                                   expect="the mean of the patch tokens, as the CNN's average pool"),
    "sup_vit_p8_b32": _supervised("--config.batch_size=32",
                                  expect="twice the steps per epoch: leaves chance sooner"),
    "sup_vit_p8_lr2e3": _supervised(lr=2e-3, expect="larger steps: sooner, or unstable"),
    "sup_vit_p8_e100": _supervised(epochs=100, expect="still rising at 40 epochs: to its plateau"),
    "sup_cnn_e100": _supervised(cnn=True, epochs=100,
                                expect="the CNN ceiling to its plateau (0.85 at 40 epochs)"),
    # The scratch reference of the MAE arms' fine-tune at 300 labels per class.
    "sup_vit_p8_300": _supervised(
        "--config.labels_per_class=300", epochs=120,
        expect="a sixth of the labels, 1,700 steps: near chance, or leaving the plateau late"),
    # (2) MAE recipes: each a pretraining, then probe / partial / 300 labels / every label.
    **_mae_arm("base", BASE, expect="the demo recipe before (BCE, mask 0.75, decoder 64 x 2, "
                                    "20 epochs): the lens and source, little substructure"),
    **_mae_arm("normpix", (*BASE, "--config.loss.type=mse", "--config.loss.norm_pix=True"),
               expect="MSE on per-patch normalised pixels (MAE's best target): more detail"),
    **_mae_arm("highpass", (*BASE, "--config.loss.type=mse", "--config.loss.norm_pix=True",
                            "--config.loss.target=highpass"),
               expect="each patch minus its blur: the few-pixel residual substructure adds"),
    **_mae_arm("visible", (*BASE, "--config.loss.masked_only=False"),
               expect="the loss on every patch (the seed's choice): the encoder must carry the "
                      "visible patches' own detail, substructure included"),
    **_mae_arm("visiblehp", VISIBLE_HP,
               expect="every patch's high-pass part: the visible detail, without the smooth "
                      "light that dominates the pixel loss"),
    **_mae_arm("visiblehp_long", (*VISIBLE_HP, "--config.phase_epochs=(20, 40)"),
               expect="the best recipe, 60 epochs (3x): MAE's probe keeps rising with length"),
    **_mae_arm("visiblehp_long180", (*VISIBLE_HP, "--config.phase_epochs=(20, 160)"),
               expect="9x the default length: on the 20 -> 60 epoch trend, the every-label "
                      "fine-tune near 0.85 and 300 per class > scratch + 0.10"),
    # One thing of the high-pass recipe (the demo default) changed at a time.
    **_mae_arm("visiblenp", (*VISIBLE_HP, "--config.loss.target=pixels"),
               expect="every patch, MSE on norm-pix pixels, no high-pass: how much of the "
                      "recipe is the loss on every patch, how much the high-pass target"),
    **_mae_arm("visiblehp_mask50", (*VISIBLE_HP, "--config.model.mask_ratio=0.5"),
               expect="half the patches visible: more of the loss on the visible detail, "
                      "the removed patches easier to predict"),
    **_mae_arm("visiblehp_dec4", (*VISIBLE_HP, "--config.model.decoder_depth=4"),
               expect="a deeper decoder takes over the reconstruction: the encoder's last "
                      "block more abstract, its probe higher (MAE Table 1)"),
    **_mae_arm("visiblehp_pool3", (*VISIBLE_HP, "--config.pool_size=16200"),
               pool="data/substructure_sim_pool10",
               expect="the best recipe on 3x the unlabelled images (16,200), 20 epochs"),
    **_mae_arm("visiblehp_pool10", VISIBLE_HP, pool="data/substructure_sim_pool10",
               expect="the best recipe on 10x the unlabelled images (~54,000), 20 epochs: the "
                      "steps of the 180-epoch arm, each image seen 20 times instead of 180"),
    **_mae_arm("mask50", (*BASE, "--config.model.mask_ratio=0.5"),
               expect="more context per removed patch: sharper predictions, finer features"),
    **_mae_arm("dec4", (*BASE, "--config.model.decoder_depth=4"),
               expect="a deeper decoder leaves the encoder's last blocks more abstract"),
    **_mae_arm("long", (*BASE, "--config.phase_epochs=(20, 40)"), expect="60 epochs, 3x the base"),
    **_mae_arm("pool3", (*BASE, "--config.pool_size=16200"), pool="data/substructure_sim_pool10",
               expect="3x the unlabelled images (16,200 of the 10x folder's train split)"),
    **_mae_arm("pool10", BASE, pool="data/substructure_sim_pool10",
               expect="10x the unlabelled images (the 10x folder's train split, ~54,000)"),
}
