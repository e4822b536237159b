import assert from "node:assert/strict";
import { describe, test } from "node:test";
import { diffConfigs, flattenConfig } from "../lib/config-diff.js";

const base = () => ({
  name: "r18-from-r50",
  experiment: "digits-kd",
  kind: "distill",
  seed: 0,
  dataset: { name: "digits", params: {}, val_fraction: 0.2 },
  student: { name: "mlp", params: { hidden: [32] } },
  teacher: {
    name: "mlp",
    params: { hidden: [256, 256] },
    weights: { run_id: "abc", checkpoint: "best" },
  },
  distill: {
    pairs: [{ student_layer: "", teacher_layer: "", loss: { name: "logits_kl" } }],
    balancer: { name: "static", params: { kd_weight: 0.7 } },
    teacher_input_adapter: null,
  },
  train: { epochs: 10, optimizer: { name: "adamw", lr: 0.001 }, grad_clip: null, amp: "none" },
  resources: { gpus: 0 },
});

describe("flattenConfig", () => {
  test("dotted leaf paths; arrays as JSON text; null is a leaf; empty objects vanish", () => {
    assert.deepEqual(flattenConfig(base()), {
      name: "r18-from-r50",
      experiment: "digits-kd",
      kind: "distill",
      seed: 0,
      "dataset.name": "digits",
      "dataset.val_fraction": 0.2,
      "student.name": "mlp",
      "student.params.hidden": "[32]",
      "teacher.name": "mlp",
      "teacher.params.hidden": "[256,256]",
      "teacher.weights.run_id": "abc",
      "teacher.weights.checkpoint": "best",
      "distill.pairs": '[{"student_layer":"","teacher_layer":"","loss":{"name":"logits_kl"}}]',
      "distill.balancer.name": "static",
      "distill.balancer.params.kd_weight": 0.7,
      "distill.teacher_input_adapter": null,
      "train.epochs": 10,
      "train.optimizer.name": "adamw",
      "train.optimizer.lr": 0.001,
      "train.grad_clip": null,
      "train.amp": "none",
      "resources.gpus": 0,
    });
  });

  test("not an object", () => {
    assert.deepEqual(flattenConfig(null), {});
    assert.deepEqual(flattenConfig([1, 2]), {});
  });
});

describe("diffConfigs", () => {
  test("only differing paths, grouped in the fixed order, name/experiment ignored", () => {
    const a = base();
    const b = base();
    b.name = "other-name";
    b.experiment = "other-experiment";
    b.seed = 1;
    b.train.optimizer.lr = 0.01;
    b.student.params.hidden = [64];
    b.dataset.val_fraction = 0.1;
    b.distill.balancer.params.kd_weight = 0.5;
    b.resources.gpus = 1;
    assert.deepEqual(
      diffConfigs([
        { name: "a", config: a },
        { name: "b", config: b },
      ]),
      [
        { group: "dataset", rows: [{ path: "dataset.val_fraction", values: [0.2, 0.1] }] },
        { group: "student", rows: [{ path: "student.params.hidden", values: ["[32]", "[64]"] }] },
        {
          group: "distill",
          rows: [{ path: "distill.balancer.params.kd_weight", values: [0.7, 0.5] }],
        },
        { group: "train", rows: [{ path: "train.optimizer.lr", values: [0.001, 0.01] }] },
        {
          group: "other",
          rows: [
            { path: "seed", values: [0, 1] },
            { path: "resources.gpus", values: [0, 1] },
          ],
        },
      ],
    );
  });

  test("a path missing from a run is undefined there (a train run has no teacher)", () => {
    const distill = base();
    const train = base();
    train.kind = "train";
    delete train.teacher;
    delete train.distill;
    const third = base();
    const groups = diffConfigs([
      { name: "d", config: distill },
      { name: "t", config: train },
      { name: "d2", config: third },
    ]);
    assert.deepEqual(
      groups.map((g) => g.group),
      ["teacher", "distill", "other"],
    );
    const teacher = groups[0].rows;
    assert.deepEqual(
      teacher.map((r) => r.path),
      [
        "teacher.name",
        "teacher.params.hidden",
        "teacher.weights.run_id",
        "teacher.weights.checkpoint",
      ],
    );
    assert.deepEqual(teacher[1].values, ["[256,256]", undefined, "[256,256]"]);
    assert.deepEqual(groups[1].rows.at(-1), {
      path: "distill.teacher_input_adapter",
      values: [null, undefined, null],
    });
    assert.deepEqual(groups[2].rows, [{ path: "kind", values: ["distill", "train", "distill"] }]);
  });

  test("a path present only in a later run is listed too", () => {
    const a = base();
    const b = base();
    b.train.ema_decay = 0.999;
    assert.deepEqual(
      diffConfigs([
        { name: "a", config: a },
        { name: "b", config: b },
      ]),
      [{ group: "train", rows: [{ path: "train.ema_decay", values: [undefined, 0.999] }] }],
    );
  });

  test("identical configs, a single run, no runs: nothing differs", () => {
    const a = base();
    const b = base();
    b.name = "renamed";
    assert.deepEqual(
      diffConfigs([
        { name: "a", config: a },
        { name: "b", config: b },
      ]),
      [],
    );
    assert.deepEqual(diffConfigs([{ name: "a", config: a }]), []);
    assert.deepEqual(diffConfigs([]), []);
  });

  test("0 and null and false and '0' all differ", () => {
    const configs = [0, null, false, "0"].map((v, i) => ({ name: `r${i}`, config: { seed: v } }));
    assert.deepEqual(diffConfigs(configs), [
      { group: "other", rows: [{ path: "seed", values: [0, null, false, "0"] }] },
    ]);
  });
});
