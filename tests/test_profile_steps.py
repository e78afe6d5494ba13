"""profile_steps cut no chunk (each new chunk length would be one more compile of the
step): the trace snaps to the loop's chunks."""

from __future__ import annotations

import types

from mae_jax.train import loop


def _plan(spe, per_call, epochs, profile):
  cfg = loop.LoopSettings(seed=0, log_every_steps=1, checkpoint_every_epochs=0,
                          checkpoint_every_steps=0, steps_per_call=per_call,
                          profile_steps=profile)
  fake = types.SimpleNamespace(settings=cfg, steps_per_epoch=spe)
  return cfg, [(e, start, num) for e in range(epochs) for start, num in loop.chunk_plan(e, 0, fake)]


def test_profile_steps_split_no_chunk_and_trace_whole_chunks(tmp_path, monkeypatch):
  calls = []
  monkeypatch.setattr(loop.jax.profiler, "start_trace", lambda folder: calls.append("start"))
  monkeypatch.setattr(loop.jax.profiler, "stop_trace", lambda: calls.append("stop"))
  monkeypatch.setattr(loop.jax, "block_until_ready", lambda x: x)
  # seed_gpu pretraining: 26 steps an epoch in one chunk; (300, 320) used to add 3 cuts.
  cfg, plan = _plan(26, 50, 14, (300, 320))
  assert {num for _, _, num in plan} == {26}
  profile = loop._Profile(cfg.profile_steps, tmp_path)   # pylint: disable=protected-access
  traced, step = [], 0
  for _, _, num in plan:
    profile.before(step)
    if profile.on:
      traced.append((step, step + num))
    step += num
    profile.after(step, None)
  assert calls == ["start", "stop"]
  assert traced == [(312, 338)]   # the first chunk at or after 300, through the one past 320
