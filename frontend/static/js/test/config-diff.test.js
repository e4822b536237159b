import assert from "node:assert/strict";
import { describe, test } from "node:test";
import { diffConfigs } from "../lib/config-diff.js";

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

  test("a section null in one run (a train run's teacher) is one row, not one per field", () => {
    const distill = base();
    const train = base();
    train.kind = "train";
    train.teacher = null;
    train.distill = null;
    assert.deepEqual(
      diffConfigs([
        { name: "d", config: distill },
        { name: "t", config: train },
      ]),
      [
        { group: "teacher", rows: [{ path: "teacher", values: ["mlp", null], section: true }] },
        { group: "distill", rows: [{ path: "distill", values: ["set", null], section: true }] },
        { group: "other", rows: [{ path: "kind", values: ["distill", "train"] }] },
      ],
    );
  });

  test("a section absent from a run is one row too, undefined there", () => {
    const train = base();
    delete train.teacher;
    const groups = diffConfigs([
      { name: "t", config: train },
      { name: "d", config: base() },
    ]);
    assert.deepEqual(groups, [
      { group: "teacher", rows: [{ path: "teacher", values: [undefined, "mlp"], section: true }] },
    ]);
  });

  test("inside a section only the runs that have it are compared", () => {
    const a = base();
    const b = base();
    b.teacher.weights.run_id = "def";
    b.teacher.name = "resnet";
    const train = base();
    train.teacher = null;
    const [teacher] = diffConfigs([
      { name: "a", config: a },
      { name: "t", config: train },
      { name: "b", config: b },
    ]);
    assert.deepEqual(teacher, {
      group: "teacher",
      rows: [
        // the name is the section's summary: no teacher.name row besides it
        { path: "teacher", values: ["mlp", null, "resnet"], section: true },
        { path: "teacher.weights.run_id", values: ["abc", undefined, "def"] },
      ],
    });
  });

  test("a nested section null in one run: one row summarised by its name", () => {
    const a = base();
    const b = base();
    a.train.scheduler = null;
    b.train.scheduler = { name: "cosine", warmup_steps: 0 };
    assert.deepEqual(
      diffConfigs([
        { name: "a", config: a },
        { name: "b", config: b },
      ]),
      [
        {
          group: "train",
          rows: [{ path: "train.scheduler", values: [null, "cosine"], section: true }],
        },
      ],
    );
  });

  test("a section in all runs is compared field by field; null and absent differ", () => {
    const a = base();
    const b = base();
    a.teacher = null;
    delete b.teacher;
    assert.deepEqual(
      diffConfigs([
        { name: "a", config: a },
        { name: "b", config: b },
      ]),
      [{ group: "teacher", rows: [{ path: "teacher", values: [null, undefined] }] }],
    );
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

describe("diffConfigs: lists", () => {
  const pair = (student, teacher, loss, params = {}) => ({
    student_layer: student,
    teacher_layer: teacher,
    loss: { name: loss, params },
  });
  const withPairs = (pairs) => {
    const config = base();
    config.distill.pairs = pairs;
    return config;
  };
  const diff = (...configs) => diffConfigs(configs.map((config, i) => ({ name: `r${i}`, config })));

  test("lists of objects are flattened by index: the differing field of the pair", () => {
    const a = withPairs([pair("", "", "logits_kl", { temperature: 4 }), pair("l2", "l3", "mse")]);
    const b = withPairs([pair("", "", "logits_kl", { temperature: 2 }), pair("l2", "l4", "mse")]);
    assert.deepEqual(diff(a, b), [
      {
        group: "distill",
        rows: [
          { path: "distill.pairs.0.loss.params.temperature", values: [4, 2] },
          { path: "distill.pairs.1.teacher_layer", values: ["l3", "l4"] },
        ],
      },
    ]);
  });

  test("an extra pair lists its fields, absent (undefined) in the shorter list", () => {
    const a = withPairs([pair("", "", "logits_kl")]);
    const b = withPairs([pair("", "", "logits_kl"), pair("l2", "l3", "mse", { beta: 1 })]);
    assert.deepEqual(diff(a, b), [
      {
        group: "distill",
        rows: [
          { path: "distill.pairs.1.student_layer", values: [undefined, "l2"] },
          { path: "distill.pairs.1.teacher_layer", values: [undefined, "l3"] },
          { path: "distill.pairs.1.loss.name", values: [undefined, "mse"] },
          { path: "distill.pairs.1.loss.params.beta", values: [undefined, 1] },
        ],
      },
    ]);
  });

  test("identical lists of objects: no rows", () => {
    assert.deepEqual(
      diff(withPairs([pair("a", "b", "mse")]), withPairs([pair("a", "b", "mse")])),
      [],
    );
  });

  test("arrays of scalars (and empty arrays) stay one value, their JSON text", () => {
    const a = base();
    const b = base();
    b.student.params.hidden = [16, 16];
    b.teacher.params.hidden = [];
    assert.deepEqual(diff(a, b), [
      { group: "student", rows: [{ path: "student.params.hidden", values: ["[32]", "[16,16]"] }] },
      { group: "teacher", rows: [{ path: "teacher.params.hidden", values: ["[256,256]", "[]"] }] },
    ]);
  });

  test("a list of objects against null or an empty list: one row, its length", () => {
    const a = withPairs([pair("", "", "logits_kl"), pair("l2", "l3", "mse")]);
    const b = withPairs(null);
    const c = withPairs([]);
    assert.deepEqual(diff(a, b, c), [
      {
        group: "distill",
        rows: [{ path: "distill.pairs", values: ["2 items", null, "[]"], section: true }],
      },
    ]);
  });

  test("a list mixing objects and values is one value", () => {
    const a = base();
    const b = base();
    a.train.extra = [{ k: 1 }, 2];
    b.train.extra = [{ k: 1 }, 3];
    assert.deepEqual(diff(a, b), [
      {
        group: "train",
        rows: [{ path: "train.extra", values: ['[{"k":1},2]', '[{"k":1},3]'] }],
      },
    ]);
  });
});
