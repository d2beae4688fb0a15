"""The project's mutation check: named semantic bugs planted one at a time, each must fail its tests.

Each mutation replaces one snippet of one guarded module (it must occur exactly once) in a copy of
the working tree, runs the tests that guard it there, and restores the file. A mutation is
*killed* when its tests fail, *survived* when they pass (the tests would not notice that bug), and
*broken* when its snippet no longer occurs (the code moved: update the mutation). The exit status
is 0 when every mutation was killed. Not part of the default test command (about 15 minutes on 2
CPU cores, mostly the parity launches)::

    python benchmarks/mutation_check.py                 # every mutation, a table at the end
    python benchmarks/mutation_check.py --only bn-      # the mutations whose name starts with "bn-"
    python benchmarks/mutation_check.py --list          # names and files, nothing run

The copy imports its own code: ``sandbox`` from its root and the built-in plugins
(``sandbox_builtins``) through a link on ``PYTHONPATH``, so a mutation never touches this tree.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PARITY = ["tests/test_parity.py", "-k", "train_what_one_process_trains or bf16 or unequal"]
SYNC_BN = ["tests/test_sync_batchnorm.py"]
HOST_SYNCS = ["tests/test_host_syncs.py", "-k", "not cuda and not two_processes and not nccl"]
HOST_SYNCS_TWO = ["tests/test_host_syncs.py", "-k", "two_processes or nccl"]
DENSITY = ["tests/test_density_estimators.py", "tests/test_density_distributed.py"]
CLAIMS = ["tests/test_claims.py"]
RUN_FENCE = ["tests/test_run_claims.py", "-k", "fence"]
PAUSED = ["tests/test_run_claims.py", "-k", "paused"]
PAIRED = ["tests/test_compare_paired.py", "tests/test_compare.py"]
STEP = ["tests/test_step_semantics.py", "tests/test_unimatch_step.py", "tests/test_log_window.py"]
SKIPPED = ["tests/test_reliability.py", "-k", "no_trace"]
LOG_RESUME_TWO = ["tests/test_distributed.py", "-k", "gmm"]
LOG_RESUME_ONE = ["tests/test_resume_distributed.py", "-k", "middle_of_a_log_window"]
LOG_WINDOW = ["tests/test_log_window.py"]
PAPER_RECIPES = ["tests/test_recipe.py", "-k", "paper_recipes"]
GONE = ["tests/test_provenance.py", "-k", "gone"]
NEW_USER = "tests/test_new_user_mistakes.py"
E = "tests/test_errors.py"
ACCUMULATION = ["tests/test_parity.py", "-k", "accumulating"]
V2_STEP = ["tests/test_unimatch_v2_step.py", "tests/test_perturbations.py", "tests/test_cutmix.py", "tests/test_step_semantics.py",
           "tests/test_model.py", "-k", "unimatch_v2 or complementary or flipped or update_teacher or in_place"]


@dataclass(frozen=True)
class Mutation:
    """One planted bug: ``old`` (occurring once in ``path``) becomes ``new``; ``tests`` are pytest arguments."""

    name: str
    path: str
    old: str
    new: str
    tests: list[str]


MUTATIONS = [
    # sandbox/train/step.py
    Mutation("step-perturbed-loss-by-own-count", "sandbox/train/step.py",
             "        return loss * self.loss_share(valid.sum(), total)\n",
             "        return loss if role == \"perturbed_loss\" else loss * self.loss_share(valid.sum(), total)\n", PARITY),
    Mutation("step-device-masks-to-host-code", "sandbox/train/step.py",
             "kept_pixel_index(labeled.host_masks, unlabeled.host_padding,",
             "kept_pixel_index(labeled.masks, unlabeled.host_padding,", HOST_SYNCS),
    Mutation("step-logged-loss-copied-to-host", "sandbox/train/step.py",
             "logs[\"loss_perturbed\"] = loss_perturbed.detach()",
             "logs[\"loss_perturbed\"] = loss_perturbed.detach().cpu()", HOST_SYNCS),
    Mutation("step-normalisations-swapped", "sandbox/train/step.py",
             "return (~padding).sum() if self.settings.unsupervised_normalisation == \"image_pixels\" else valid.sum()",
             "return valid.sum() if self.settings.unsupervised_normalisation == \"image_pixels\" else (~padding).sum()",
             STEP),
    # UniMatch V2's step (issue 37)
    Mutation("v2-masks-not-complementary", "plugins/perturbations.py",
             "torch.cat([first, 2.0 - first])", "torch.cat([first, first])", V2_STEP),
    Mutation("v2-every-pair-masked", "plugins/perturbations.py",
             "            first[unmasked] = 1.0\n", "", V2_STEP),
    Mutation("v2-one-mask-per-map", "plugins/perturbations.py",
             "            if width in masks:\n                continue\n", "", V2_STEP),
    Mutation("v2-teacher-in-train-mode", "sandbox/train/step.py",
             "teacher.train(settings.teacher_mode == \"train\")", "teacher.train(True)", V2_STEP),
    Mutation("v2-normalised-by-trusted-pixels", "sandbox/train/step.py",
             "return (~padding).sum() if self.settings.unsupervised_normalisation == \"image_pixels\" else valid.sum()",
             "return valid.sum()", V2_STEP),
    Mutation("v2-partners-rolled-not-flipped", "sandbox/train/cutmix.py",
             "tensor.flip(0) if flipped else", "tensor.roll(1, dims=0) if flipped else", V2_STEP),
    Mutation("v2-labeled-in-the-strong-pass", "sandbox/train/step.py",
             "labeled_logits = student(labeled.images).logits if labels.student_out is None else",
             "labeled_logits = student(torch.cat([labeled.images, views[0].images])).logits[:count] if labels.student_out is None else",
             V2_STEP),
    Mutation("v2-in-place-keeps-clean-logits", "sandbox/train/student_pass.py",
             "            return classify(network, network.decode(list(moved)), auxiliary=auxiliary)\n",
             "            return classify(network, network.decode(maps))\n", V2_STEP),
    Mutation("v2-ema-buffers-copied", "sandbox/train/ema.py",
             "            teacher_buffer.lerp_(student_buffer, 1.0 - decay)\n", "            teacher_buffer.copy_(student_buffer)\n",
             V2_STEP),
    Mutation("v2-in-place-no-auxiliary-statistics", "sandbox/train/student_pass.py",
             "        return classify(network, moved, auxiliary=auxiliary)\n", "        return classify(network, moved)\n",
             V2_STEP),
    # train.deterministic and the compute record (issue 38)
    Mutation("det-switch-ignored", "sandbox/train/loop.py",
             "        apply_determinism(settings.deterministic)\n", "        apply_determinism(False)\n",
             [E, "-k", "deterministic"]),
    Mutation("det-refusal-blamed-on-the-plugin", "sandbox/train/plugin_calls.py",
             "        if op is not None:  # torch's own refusal", "        if False:  # torch's own refusal",
             [E, "-k", "deterministic"]),
    Mutation("det-compare-ignores-threads", "sandbox/analysis/compare.py",
             "        if len(values) > 1:\n            found.append(f\"{key} ({', '.join(values)})\")",
             "        if len(values) > 2:\n            found.append(f\"{key} ({', '.join(values)})\")",
             ["tests/test_compare.py", "-k", "threads_or_cpu"]),
    Mutation("det-compute-not-recorded", "sandbox/train/loop.py",
             "            \"compute\": compute_record(self.accelerator.device, self.recipe.train.deterministic),\n", "",
             ["tests/test_training.py", "-k", "saved_recipe_reproduces"]),
    # one agreement (issue 39)
    Mutation("agree-store-values-all-own", "sandbox/processes/failures.py",
             'owner.call("get", self.key(f"{_VALUE}/{rank}")).decode() for rank in range(owner.world_size)',
             'owner.call("get", self.key(f"{_VALUE}/{owner.rank}")).decode() for rank in range(owner.world_size)',
             ["tests/test_agreement.py"]),
    Mutation("agree-fallback-last-failure", "sandbox/processes/agreement.py",
             "        rank, message = failed[0]\n", "        rank, message = failed[-1]\n", ["tests/test_agreement.py"]),
    # train.total_batch_size: gradient accumulation (issue 38)
    Mutation("acc-loss-not-divided", "sandbox/train/iteration.py",
             "self.accelerator.backward(loss / count if count > 1 else loss)", "self.accelerator.backward(loss)", ACCUMULATION),
    Mutation("acc-gradients-zeroed-per-micro-batch", "sandbox/train/iteration.py",
             "            logs.append(micro_logs)\n",
             "            logs.append(micro_logs)\n            self.optimizer.zero_grad(set_to_none=True)\n", ACCUMULATION),
    Mutation("acc-stream-ignores-accumulation", "sandbox/train/loop.py",
             "world, rank, self.batches.accumulation)", "world, rank, 1)", ACCUMULATION),
    Mutation("acc-virtual-rank-interleaved", "sandbox/data/views.py",
             "virtual_rank = self.rank * self.micro_batches + micro_batch",
             "virtual_rank = micro_batch * self.num_replicas + self.rank", ["tests/test_accumulation.py"]),
    Mutation("acc-global-count-accumulated", "sandbox/train/accumulation.py",
             "if plan.accumulation > 1 and settings.loss_pixel_count == \"global\":", "if False:",
             ["tests/test_accumulation.py"]),
    Mutation("acc-skip-restores-the-last-micro-batch-only", "sandbox/train/iteration.py",
             "            with self.accelerator.autocast():\n                if batch.unlabeled is None:",
             "            self.state.remember()\n            with self.accelerator.autocast():\n                if batch.unlabeled is None:",
             SKIPPED),
    Mutation("acc-plan-traces-one-micro-batch", "sandbox/bench/plan.py",
             "fake_training(training, target, batches.accumulation)", "fake_training(training, target)",
             ["tests/test_accumulation.py"]),
    Mutation("compare-new-setting-splits-groups", "sandbox/analysis/compare.py",
             "        if found and table_of(key) in tables:", "        if False:",
             ["tests/test_compare.py", "-k", "added_since"]),
    Mutation("step-log-step-off-by-one", "sandbox/train/log_window.py",
             "    finished = step + 1\n", "    finished = step\n", STEP),
    Mutation("step-skip-keeps-teacher-statistics", "sandbox/train/step_state.py",
             "        tensors = [*self.student.buffers(), *self.teacher.buffers()]\n",
             "        tensors = [*self.student.buffers()]\n", SKIPPED),
    Mutation("step-skip-keeps-estimator-schedule", "sandbox/train/step_state.py",
             "            self.scheduler.load_state_dict(self._host[\"scheduler\"])\n", "            pass\n", SKIPPED),
    # sandbox/processes/batchnorm.py
    Mutation("bn-plain-average-of-means", "sandbox/processes/batchnorm.py",
             "global_mean = (means * counts).sum(0) / total.clamp(min=1.0)", "global_mean = means.mean(0)", SYNC_BN),
    Mutation("bn-no-between-process-spread", "sandbox/processes/batchnorm.py",
             "global_squares = (squares + counts * (means - global_mean).pow(2)).sum(0)",
             "global_squares = squares.sum(0)", SYNC_BN),
    Mutation("bn-biased-running-variance", "sandbox/processes/batchnorm.py",
             "unbiased = variance.detach() * total / (total - 1).clamp(min=1.0)",
             "unbiased = variance.detach()", SYNC_BN),
    Mutation("bn-batch-statistics-in-eval-mode", "sandbox/processes/batchnorm.py",
             "if not module.training or process_count() == 1:", "if process_count() == 1:", SYNC_BN),
    # sandbox/processes/collectives.py
    Mutation("dist-share-without-process-count", "sandbox/processes/collectives.py",
             "return count.float() * process_count() / total.float().clamp(min=1.0)",
             "return count.float() / total.float().clamp(min=1.0)", PARITY),
    Mutation("dist-backward-without-all-reduce", "sandbox/processes/collectives.py",
             "        torch.distributed.all_reduce(summed)\n        return summed\n\n\ndef differentiable",
             "        return summed\n\n\ndef differentiable", SYNC_BN),
    Mutation("dist-host-values-in-rank-0-slot", "sandbox/processes/collectives.py",
             "    slots[process_rank()] = value\n", "    slots[0] = value\n", HOST_SYNCS_TWO),
    Mutation("dist-logged-sum-not-averaged", "sandbox/processes/collectives.py",
             "(sum_over_processes(stacked) / processes).tolist()", "sum_over_processes(stacked).tolist()", PARITY),
    # sandbox/density/online.py
    Mutation("density-pooled-gradient-unweighted", "sandbox/density/online.py",
             "flat = torch.cat([g.reshape(-1).float() * weight for g in grads]",
             "flat = torch.cat([g.reshape(-1).float() for g in grads]", DENSITY),
    Mutation("density-nll-by-own-count", "sandbox/density/online.py",
             "        nll = nll_sum / total\n", "        nll = nll_sum / max(count, 1)\n", DENSITY),
    Mutation("density-remainder-to-smallest", "sandbox/density/online.py",
             "key=lambda index: (-(exact[index] - shares[index]), index)",
             "key=lambda index: (exact[index] - shares[index], index)", DENSITY),
    Mutation("density-nonfinite-update-kept", "sandbox/density/online.py",
             "kept = torch.where(finite, after, before).split(", "kept = after.split(", DENSITY),
    # sandbox/host_side.py (the host-sync code)
    Mutation("host-device-copy-is-the-host-tensor", "sandbox/host_side.py",
             "    return moved.detach() if moved is tensor else moved\n", "    return moved\n", HOST_SYNCS),
    Mutation("step-per-process-by-global-count", "sandbox/train/step.py",
             "        divide = counts if self.per_process else totals\n", "        divide = totals\n", STEP),
    Mutation("step-per-process-warm-up-by-global-count", "sandbox/train/step.py",
             "return counts if self.per_process else sum_over_processes(counts)", "return sum_over_processes(counts)", STEP),
    Mutation("step-per-process-without-ddp-average", "sandbox/train/step.py",
             "            return count.float() / total.float().clamp(min=1.0)\n",
             "            return share_of_total(count, total)\n", STEP),
    Mutation("step-global-by-own-count", "sandbox/train/step.py",
             "        divide = counts if self.per_process else totals\n", "        divide = counts\n", STEP),
    Mutation("step-trusted-ratio-by-own-count", "sandbox/train/step.py",
             "weak_pixels=totals[2]", "weak_pixels=divide[2]", STEP),
    Mutation("recipe-unimatch-global-normalisation", "recipes/unimatch_pascal.toml",
             'loss_pixel_count = "per_process"', 'loss_pixel_count = "global"', PAPER_RECIPES),
    Mutation("recipe-ddfp-global-normalisation", "recipes/ddfp_pascal.toml",
             'loss_pixel_count = "per_process"', 'loss_pixel_count = "global"', PAPER_RECIPES),
    Mutation("recipe-default-per-process", "sandbox/recipe.py",
             'loss_pixel_count: Literal["global", "per_process"] = Field(\n        "global",',
             'loss_pixel_count: Literal["global", "per_process"] = Field(\n        "per_process",',
             PAPER_RECIPES + ["tests/test_step_semantics.py"]),
    Mutation("resume-added-setting-ignored-at-any-value", "sandbox/recipe.py",
             "significant = [k for k in keys if k in old or not is_default_setting(k, new[k])]",
             "significant = [k for k in keys if k in old]", ["tests/test_training.py", "-k", "tables_a_saved"]),
    # sandbox/train/loop.py, sandbox/train/log_window.py: the log window across a resume
    Mutation("log-window-saved-from-main-only", "sandbox/train/loop.py",
             "        if process_count() > 1:\n            windows = [None] * process_count()\n",
             "        if False:\n            windows = [None] * process_count()\n", LOG_RESUME_TWO),
    Mutation("log-window-rank0-on-every-rank", "sandbox/train/loop.py",
             "own = saved[process_rank()] if", "own = saved[0] if", LOG_WINDOW + ["-k", "own_window"]),
    Mutation("log-window-not-restored", "sandbox/train/loop.py",
             "self.log_sums, self.log_counts, self.log_steps = dict(own[0]), dict(own[1]), own[2]",
             "self.log_sums, self.log_counts, self.log_steps = {}, {}, 0", LOG_RESUME_ONE),
    Mutation("log-window-other-world-sums-not-averaged", "sandbox/train/log_window.py",
             "float32(counts[key] * math.fsum(means) / len(means))", "float32(counts[key] * math.fsum(means))", LOG_WINDOW),
    Mutation("log-window-old-checkpoint-window-dropped", "sandbox/train/loop.py",
             '{"sums": state.get("log_sums", {}), "counts": state.get("log_counts", {}), "steps": state.get("log_steps", 0)}',
             '{"sums": {}, "counts": {}, "steps": 0}', LOG_WINDOW),
    # sandbox/plugins.py, loop.py, cli/run.py: where each component came from
    Mutation("provenance-not-recorded", "sandbox/train/loop.py",
             "                record_provenance(run_dir, run_provenance(recipe, registry, trainer.unused_tables))\n", "", GONE),
    Mutation("provenance-built-in-as-entry-point", "sandbox/plugins.py",
             "source = BUILT_IN if package == OWN_DISTRIBUTION else ENTRY_POINT", "source = ENTRY_POINT",
             ["tests/test_registry.py", "-k", "builtins_arrive"]),
    Mutation("provenance-gone-component-unnamed", "sandbox/plugins.py",
             "        if missing is None:\n            raise\n", "        raise\n", GONE),
    Mutation("provenance-registered-component-blamed", "sandbox/plugins.py",
             "        if registry is not None and spec.name in registry.names(kind):\n            continue\n", "", GONE),
    Mutation("provenance-other-version-unpinned", "sandbox/plugins.py",
             "    if installed != origin.version:\n", "    if False:\n", GONE),
    Mutation("provenance-gone-plugin-file-unnamed", "sandbox/plugins.py",
             "            here = Path(origin.plugin).is_file()\n", "            here = True\n", GONE),
    Mutation("provenance-resume-overwrites-record", "sandbox/train/loop.py",
             "    if recorded is None:\n        try:\n", "    if True:\n        try:\n", GONE),
    Mutation("provenance-resume-not-checked", "sandbox/cli/run.py",
             "load_run_recipe(recipe, set_, plugin)",
             "__import__('sandbox.recipe').recipe.load_resolved_recipe(recipe, set_, plugin)", GONE),
    # issue 36: data, strict JSON, compare, plot, probe
    Mutation("data-all-ignore-labeled-accepted", "sandbox/data/segmentation_files.py",
             "            labeled_pixels += bool(values)\n",
             "            labeled_pixels += 1\n",
             ["tests/test_dataset_folder.py", NEW_USER, "-k", "labeled_pixel or all_ignore"]),
    Mutation("data-val-labels-unchecked", "sandbox/data/segmentation_files.py",
             'for name, part in (("labeled", source.labeled), ("val", source.val)):',
             'for name, part in (("labeled", source.labeled),):',
             ["tests/test_dataset_folder.py", "-k", "labeled_pixel"]),
    Mutation("data-mask-palette-ignored", "plugins/folder_dataset.py",
             "own = mask_palette(masks[0], count) if masks else None", "own = None",
             ["tests/test_dataset_folder.py", "tests/test_plot_predict.py", "-k", "paletted or own_masks"]),
    Mutation("data-split-sizes-wrong-part", "sandbox/train/builder.py",
             "{len(source.unlabeled)} unlabeled", "{len(source.labeled)} unlabeled",
             [NEW_USER, "-k", "split_sizes"]),
    Mutation("json-non-finite-kept", "sandbox/rundir/files.py",
             "return value if math.isfinite(value) else None", "return value",
             ["tests/test_compare.py", "-k", "not_finite"]),
    Mutation("json-metrics-line-not-strict", "sandbox/rundir/directory.py",
             'line = (strict_json(record) + "\\n").encode()', 'line = (json.dumps(record) + "\\n").encode()',
             [NEW_USER, "-k", "strict_json"]),
    Mutation("compare-mixed-datasets-unwarned", "sandbox/analysis/report.py",
             "    lines = (dataset_line(comparison), compute_line(comparison),",
             "    lines = (compute_line(comparison),",
             ["tests/test_compare.py", "-k", "different_datasets"]),
    Mutation("compare-training-split-is-a-dataset", "sandbox/analysis/compare.py",
             'if table != "dataset" or option in TRAINING_SPLIT_OPTIONS or (option == "seed" and not seeded_val):',
             'if table != "dataset" or (option == "seed" and not seeded_val):',
             ["tests/test_compare.py", "-k", "training_split"]),
    Mutation("compare-shapes-seed-not-a-dataset", "sandbox/analysis/compare.py",
             'if table != "dataset" or option in TRAINING_SPLIT_OPTIONS or (option == "seed" and not seeded_val):',
             'if table != "dataset" or option in TRAINING_SPLIT_OPTIONS or option == "seed":',
             ["tests/test_compare.py", "-k", "training_split"]),
    Mutation("compare-caption-as-markup", "sandbox/analysis/report.py",
             "caption=Text(caption(comparison)))", "caption=caption(comparison))",
             ["tests/test_compare.py", "-k", "different_datasets"]),
    Mutation("compare-disk-of-one-run", "sandbox/cli/compare.py",
             "size = sum(folder_bytes(run.path) for run in runs)", "size = folder_bytes(runs[0].path)",
             ["tests/test_compare.py", "-k", "different_datasets"]),
    Mutation("plot-bad-line-silent", "sandbox/analysis/curves.py",
             "        elif warn is not None:\n", "        elif warn is None:\n",
             ["tests/test_plot_predict.py", "-k", "truncated"]),
    Mutation("plot-one-run-no-legend", "sandbox/analysis/curves.py",
             "    if curves:  # one run too", "    if len(curves) > 1:  # one run too",
             ["tests/test_plot_predict.py", "-k", "truncated"]),
    Mutation("probe-images-not-clamped", "sandbox/cli/probe.py",
             "        return count\n    return images\n", "        return images\n    return images\n",
             ["tests/test_probe.py", "-k", "clamped"]),
    Mutation("probe-progress-before-the-batch", "sandbox/analysis/probe_pass.py",
             "progress(min(end, images.shape[0]))", "progress(min(start, images.shape[0]))",
             ["tests/test_probe.py", "-k", "clamped"]),
    # issue 36: CLI errors, plugins given twice or without hooks, --set/--grid
    Mutation("cli-bench-workers-unchecked", "sandbox/cli/bench.py",
             "    if not all(part.isdecimal() for part in parts):\n", "    if False:\n", [E, "-k", "workers"]),
    Mutation("recipe-name-length-unchecked", "sandbox/recipe.py",
             "        if len(longest.encode()) > limit:\n", "        if False:\n", [E, "-k", "longer"]),
    Mutation("recipe-name-length-in-characters", "sandbox/recipe.py",
             "        if len(longest.encode()) > limit:\n", "        if len(longest) > limit:\n", [E, "-k", "longer"]),
    Mutation("recipe-name-nul-accepted", "sandbox/recipe.py",
             '        if "\\0" in value:\n', "        if False:\n", [E, "-k", "NUL"]),
    Mutation("grid-run-folder-length-unchecked", "sandbox/sweep/grid.py",
             "        if size > limit:\n", "        if False:\n", [E, "-k", "longer"]),
    Mutation("backbone-output-stride-unchecked", "plugins/backbones.py",
             "        if output_stride not in OUTPUT_STRIDES:\n", "        if False:\n", [E, "-k", "stride or dilate"]),
    Mutation("backbone-timm-assertion-bare", "plugins/backbones.py",
             "        except AssertionError as error:", "        except ImportError as error:", [E, "-k", "stride or dilate"]),
    Mutation("plugins-same-file-run-twice", "sandbox/plugins.py",
             "        if loaded is not None and same_file(loaded, path):\n", "        if False:\n", [E, "-k", "twice"]),
    Mutation("plugins-same-file-registered-twice", "sandbox/plugins.py",
             "if manager.is_registered(module) or same_file_registered(manager, module):",
             "if manager.is_registered(module):", [E, "-k", "twice"]),
    Mutation("cli-plugin-recorded-twice", "sandbox/cli/common.py",
             "        first.setdefault(as_recipe_plugin(spec), spec)\n", "        first.setdefault(spec, spec)\n",
             [E, "-k", "twice"]),
    Mutation("plugins-without-hooks-accepted", "sandbox/plugins.py",
             "        if not manager.get_hookcallers(module):\n", "        if False:\n", [E, "-k", "plugin"]),
    Mutation("plugins-folder-path-imported", "sandbox/plugins.py",
             '    if not all(part.isidentifier() for part in spec.split(".")) and Path(spec).is_dir():\n',
             "    if False:\n", [E, "-k", "plugin"]),
    Mutation("recipe-inline-table-replaces", "sandbox/recipe.py",
             "        table.update(merge(table, {path[-1]: value}))\n", "        table[path[-1]] = value\n",
             [E, "-k", "inline or different_keys"]),
    Mutation("ablate-set-grid-clash-unchecked", "sandbox/cli/ablate.py",
             "    set_by_the_grid(overrides, axes)\n", "", [E, "-k", "grid"]),
    Mutation("grid-set-table-holding-grid-key-missed", "sandbox/sweep/grid.py",
             "(key[:len(path)] == path and holds(value, key[len(path):]))", "(key == path)", [E, "-k", "grid"]),
    Mutation("grid-grid-table-holding-set-key-missed", "sandbox/sweep/grid.py",
             "path[:len(key)] == key and any(holds(grid_value, path[len(key):]) for grid_value in values)", "False",
             [E, "-k", "grid"]),
    Mutation("grid-set-table-without-grid-key-refused", "sandbox/sweep/grid.py",
             "(key[:len(path)] == path and holds(value, key[len(path):]))", "(key[:len(path)] == path)",
             [E, "-k", "grid"]),
    Mutation("grid-protected-key-hint-of-seeds", "sandbox/sweep/grid.py",
             "itself ({PROTECTED_KEYS[key]})", "itself (use --seeds for seeds)", [E, "-k", "grid"]),
    # issue 36: trackers after resumes, the perturbation's checks, SIGTERM, disk retention
    Mutation("tracker-resume-without-purge-step", "sandbox/train/accelerator.py",
             'return {"tensorboard": {"purge_step": first_step}} if "tensorboard" in trackers else {}', "return {}",
             ["tests/test_trackers.py", "-k", "one_value_per_step"]),
    Mutation("tracker-finished-run-evaluation-logged-again", "sandbox/train/loop.py",
             "if log:  # as metrics.jsonl", "if True:  # as metrics.jsonl", ["tests/test_trackers.py", "-k", "one_value_per_step"]),
    Mutation("tracker-missing-package-unchecked", "sandbox/train/accelerator.py",
             "    check_trackers(trackers)\n    join_restarted_attempt", "    join_restarted_attempt",
             ["tests/test_trackers.py", "-k", "package_is_missing"]),
    Mutation("relative-norm-squares-overflow", "sandbox/train/step.py",
             "    return scale, unit\n", "    return torch.ones_like(scale), values.norm(dim=1)\n",
             ["tests/test_training.py", "-k", "runaway"]),
    Mutation("log-window-left-out-unnamed", "sandbox/train/log_window.py",
             "    if not left_out:\n        return None", "    if True:\n        return None",
             ["tests/test_training.py", "-k", "not_finite_is_named"]),
    Mutation("loop-left-out-note-not-printed", "sandbox/train/loop.py",
             "                        reporter.warn(note)\n", "                        pass\n",
             ["tests/test_training.py", "-k", "not_finite_is_named"]),
    Mutation("perturbed-any-floating-dtype", "sandbox/train/plugin_calls.py",
             "perturbed.dtype not in accepted", "not perturbed.dtype.is_floating_point",
             ["tests/test_training.py", "-k", "another_dtype or autocasts_dtype"]),
    Mutation("perturbed-autocast-dtype-refused", "sandbox/train/plugin_calls.py",
             "[torch.float32, autocast] if autocast is not None else []", "[]",
             ["tests/test_training.py", "-k", "another_dtype or autocasts_dtype"]),
    Mutation("sigterm-stops-silently", "sandbox/processes/failures.py",
             "        if line:\n            try:", "        if False:\n            try:", ["tests/test_reliability.py", "-k", "sigterm_during"]),
    Mutation("retention-kept-count-constant", "sandbox/train/loop.py",
             "[:-self.recipe.train.checkpoints_kept]", "[:-2]", ["tests/test_reliability.py", "-k", "retention_keeps"]),
    Mutation("retention-finished-run-keeps-checkpoints", "sandbox/train/loop.py",
             "if not self.recipe.train.keep_checkpoints_when_done and self.run_dir.checkpoints.is_dir():", "if False:",
             ["tests/test_reliability.py", "-k", "retention_keeps"]),
    Mutation("resume-of-finished-run-without-checkpoints-retrains", "sandbox/train/loop.py",
             "if not candidates and self.run_dir.summary_file.is_file():", "if False:",
             ["tests/test_reliability.py", "-k", "retention_keeps"]),
    Mutation("ablate-list-without-disk-line", "sandbox/sweep/status.py",
             "    if folder is not None:\n        console.print(disk_line(statuses, folder))\n", "",
             ["tests/test_ablate.py", "-k", "how_much_each_run"]),
    Mutation("recipe-name-inherited-from-base", "sandbox/recipe.py",
             '    inherited.pop("name", None)', "    pass", ["tests/test_recipe.py", "-k", "name_is_named"]),
    Mutation("overwrite-deletes-a-folder-without-run", "sandbox/rundir/directory.py",
             "            if not self.recipe_file.is_file():\n                raise SandboxError(\n                    f\"--overwrite:",
             "            if False:\n                raise SandboxError(\n                    f\"--overwrite:", [NEW_USER, "-k", "holds_no_run"]),
    Mutation("data-absent-class-unwarned", "sandbox/data/segmentation_files.py",
             "    if absent:\n        print(", "    if False:\n        print(", ["tests/test_dataset_folder.py", "-k", "no_mask_holds"]),
    Mutation("recipe-root-tilde-not-expanded", "sandbox/recipe.py",
             '    if isinstance(root, str) and root.startswith("~"):', "    if False:",
             ["tests/test_dataset_folder.py", "-k", "home_folder"]),
    Mutation("probe-recipe-file-not-its-run", "sandbox/cli/probe.py",
             "    return path.parent if path.is_file() and path.name == RECIPE_FILE else path\n", "    return path\n",
             ["tests/test_probe.py", "-k", "default_is_the_runs"]),
    Mutation("plugins-file-shadows-a-module", "sandbox/plugins.py",
             "        if clash is not None and os.path.realpath(clash) != os.path.realpath(path):",
             "        if False:", [NEW_USER, "-k", "named_like_a_module"]),
    Mutation("recipe-boolean-read-as-number", "sandbox/recipe.py",
             "        if isinstance(value, bool) and field is not None and is_number(field.annotation):",
             "        if False:", ["tests/test_recipe.py", "-k", "true_or_false"]),
    Mutation("ctrl-c-stops-silently", "sandbox/train/loop.py",
             '                line = self._stop_note("Ctrl-C")\n', "                line = None\n",
             ["tests/test_reliability.py", "-k", "ctrl_c"]),
    Mutation("data-orphan-mask-dropped", "plugins/folder_dataset.py",
             "        if stem not in images:\n            raise FileNotFoundError(orphan_mask(",
             "        if False:\n            raise FileNotFoundError(orphan_mask(", ["tests/test_dataset_folder.py", "-k", "readable_image"]),
    # sandbox/rundir/claims.py
    Mutation("claims-takeover-without-reread", "sandbox/rundir/claims.py",
             "        current = read_claim(path)\n        if current is None or current.token != stale.token or "
             "not current.is_stale():\n            return False, None\n", "", CLAIMS),
    Mutation("claims-reread-ignores-staleness", "sandbox/rundir/claims.py",
             "current.token != stale.token or not current.is_stale():", "current.token != stale.token:", CLAIMS),
    Mutation("claims-refresh-without-stall-check", "sandbox/rundir/claims.py",
             "        if time.monotonic() - began > self.mine.timeout_s / 2:  # stalled: a taker may be at work\n"
             "            return False\n", "", CLAIMS),
    Mutation("claims-stall-check-at-whole-timeout", "sandbox/rundir/claims.py",
             "if time.monotonic() - began > self.mine.timeout_s / 2:",
             "if time.monotonic() - began > self.mine.timeout_s:", CLAIMS),
    Mutation("claims-release-without-token-check", "sandbox/rundir/claims.py",
             "        if holds(path, mine):\n            path.unlink(missing_ok=True)\n",
             "        path.unlink(missing_ok=True)\n", CLAIMS),
    Mutation("claims-staleness-reversed", "sandbox/rundir/claims.py",
             "return self.silent_for(now) > self.timeout_s or self.holder_is_gone()",
             "return self.silent_for(now) < self.timeout_s or self.holder_is_gone()", CLAIMS),
    Mutation("claims-refresh-rewrites-claim", "sandbox/rundir/claims.py",
             "            beat(self.path, self.mine)\n", "            replace_file(self.path, self.mine.encode())\n", CLAIMS),
    Mutation("claims-staleness-on-holders-clock", "sandbox/rundir/claims.py",
             "    return replace(claim, refreshed_at=refreshed_at, where=path.parent)\n",
             "    return claim\n", CLAIMS),
    Mutation("claims-server-now-is-local-clock", "sandbox/rundir/claims.py",
             "        return os.fstat(descriptor).st_mtime\n    finally:\n        os.close(descriptor)\n        probe",
             "        return time.time()\n    finally:\n        os.close(descriptor)\n        probe", CLAIMS),
    Mutation("claims-takeover-keeps-old-heartbeat", "sandbox/rundir/claims.py",
             "        heartbeat_path(path, stale.token).unlink(missing_ok=True)\n", "", CLAIMS),
    # sandbox/rundir/directory.py, loop.py (the fenced writes)
    Mutation("fence-file-published-unchecked", "sandbox/rundir/directory.py",
             "        write_atomically(path, data, before_publish=self.check_writable)\n",
             "        write_atomically(path, data)\n", RUN_FENCE),
    Mutation("fence-metrics-line-unchecked", "sandbox/rundir/directory.py",
             "            self.check_writable()\n            os.write(descriptor, line)\n",
             "            os.write(descriptor, line)\n", RUN_FENCE),
    Mutation("fence-checkpoint-published-unchecked", "sandbox/rundir/directory.py",
             "        write_atomically(staged / COMPLETE_MARKER, str(step).encode())\n        self.check_writable()\n",
             "        write_atomically(staged / COMPLETE_MARKER, str(step).encode())\n", RUN_FENCE),
    Mutation("fence-lost-checkpoint-left-staged", "sandbox/train/loop.py",
             "                shutil.rmtree(staged, ignore_errors=True)\n                raise\n",
             "                raise\n", PAUSED),
    # sandbox/analysis/paired.py, student_t.py
    Mutation("paired-degenerate-interval-unmarked", "sandbox/analysis/paired.py",
             "        if all_equal(self.deltas):\n            return CI_ZERO_VARIANCE\n", "", PAIRED),
    Mutation("paired-population-std", "sandbox/analysis/paired.py",
             "* statistics.stdev(values) / math.sqrt(len(values))",
             "* statistics.pstdev(values) / math.sqrt(len(values))", PAIRED),
    Mutation("paired-normal-quantile", "sandbox/analysis/paired.py",
             "t_quantile((1.0 + level) / 2.0, len(values) - 1)", "1.96", PAIRED),
    Mutation("paired-unpaired-difference", "sandbox/analysis/paired.py",
             "(seed, score - baseline[seed])", "(seed, score - statistics.fmean(baseline.values()))", PAIRED),
    Mutation("paired-exact-equality-only", "sandbox/analysis/paired.py",
             "return spread <= EQUAL_DIFFERENCES_TOLERANCE * max(1.0, max(abs(value) for value in values))",
             "return spread == 0.0", PAIRED),
    Mutation("paired-excludes-zero-above-only", "sandbox/analysis/paired.py",
             "return interval[0] > 0 or interval[1] < 0", "return interval[0] > 0", PAIRED),
    Mutation("student-t-lower-tail-lost", "sandbox/analysis/student_t.py",
             "return 1.0 - tail if t > 0 else tail", "return 1.0 - tail", PAIRED),
]
"""The named mutations, by guarded module."""


def copy_of_tree(destination: Path) -> Path:
    """The working tree's files known to git (as they are now, changes included) under ``destination/tree``,
    and ``destination/path/sandbox_builtins`` linking its plugins; returns the tree."""
    tree = destination / "tree"
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            check=True, capture_output=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        source = ROOT / name
        if source.is_file():
            (tree / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, tree / name)
    (destination / "path").mkdir()
    (destination / "path" / "sandbox_builtins").symlink_to(tree / "plugins")
    return tree


def run_mutation(mutation: Mutation, tree: Path, env: dict[str, str]) -> tuple[str, float]:
    """``(verdict, seconds)`` of ``mutation`` applied in ``tree`` (restored afterwards)."""
    path = tree / mutation.path
    original = path.read_text()
    if original.count(mutation.old) != 1:
        return f"broken (snippet found {original.count(mutation.old)} times)", 0.0
    path.write_text(original.replace(mutation.old, mutation.new))
    start = time.perf_counter()
    try:
        command = [sys.executable, "-m", "pytest", "-q", "-x", "-n", "0", "-p", "no:cacheprovider", *mutation.tests]
        result = subprocess.run(command, cwd=tree, env=env, capture_output=True, text=True)
    finally:
        path.write_text(original)
    seconds = time.perf_counter() - start
    if result.returncode == 1:
        return "killed", seconds
    if result.returncode == 0:
        return "survived", seconds
    tail = (result.stdout + result.stderr).strip().splitlines()[-1:] or ["?"]
    return f"error (pytest exit {result.returncode}: {tail[0][:80]})", seconds


def main() -> int:
    """Run the selected mutations and print the table; 0 when every one was killed."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="run the mutations whose name starts with this")
    parser.add_argument("--list", action="store_true", help="list the mutations and exit")
    options = parser.parse_args()
    selected = [m for m in MUTATIONS if m.name.startswith(options.only)]
    if options.list:
        for mutation in selected:
            print(f"{mutation.name:<40} {mutation.path}")
        return 0
    if not selected:
        print(f"mutation_check: no mutation's name starts with {options.only!r} (see --list)", file=sys.stderr)
        return 2
    rows = []
    with tempfile.TemporaryDirectory(prefix="mutation_check_") as folder:
        tree = copy_of_tree(Path(folder))
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tree), str(Path(folder) / "path")])}
        for mutation in selected:
            verdict, seconds = run_mutation(mutation, tree, env)
            print(f"{mutation.name}: {verdict} ({seconds:.0f} s)", flush=True)
            rows.append((mutation, verdict, seconds))
    print("\n| mutation | file | tests | result | s |\n|---|---|---|---|---|")
    for mutation, verdict, seconds in rows:
        tests = " ".join(arg for arg in mutation.tests if arg.startswith("tests/"))
        print(f"| {mutation.name} | {mutation.path} | {tests} | {verdict} | {seconds:.0f} |")
    killed = sum(verdict == "killed" for _, verdict, _ in rows)
    print(f"\n{killed} of {len(rows)} mutations killed (torch {torch_version()}, {sys.platform})")
    return 0 if killed == len(rows) else 1


def torch_version() -> str:
    """The installed torch's version (without importing it into this process)."""
    from importlib.metadata import version

    return version("torch")


if __name__ == "__main__":
    sys.exit(main())
