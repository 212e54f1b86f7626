// One node's card in the cluster view (the master or a worker: facts, memory, live figures, its layers with their
// tensors on demand), and the hop drawn between two cards.

import { el, formatBytes, formatMs } from "./dom.js";

/** "model.layers.7" → 7 */
function layerIndex(name) {
  return Number(name.slice(name.lastIndexOf(".") + 1));
}

/** [0,1,2,3,6] → "0–3, 6" (inclusive, like Cake's "model.layers.0-3") */
function layerRanges(names) {
  const indices = names.map(layerIndex).sort((a, b) => a - b);
  const parts = [];
  let start = null;
  indices.forEach((index, i) => {
    if (start === null) start = index;
    if (indices[i + 1] !== index + 1) {
      parts.push(start === index ? String(index) : `${start}–${index}`);
      start = null;
    }
  });
  return parts.join(", ");
}

function memoryOf(node) {
  const total = node.vram_bytes;
  // A worker that is down reports no used or free memory: unknown, not empty.
  if (!total || (node.memory_used_bytes == null && node.memory_free_bytes == null)) return null;
  const used = node.memory_used_bytes ?? total - node.memory_free_bytes;
  return { used: Math.max(0, Math.min(used, total)), total };
}

/** One node's card: built once, then `update(node)` on every poll. */
export class NodeCard {
  constructor(name, role, expanded) {
    this.name = name;
    this.details = {};
    this.expanded = expanded; // shared Set of "node|layer" keys, survives re-renders
    this.layerKey = null; // nothing drawn yet
    this.status = el("span", { className: "status" });
    this.facts = el("dl", { className: "facts" });
    this.memoryFill = el("span", { className: "fill" });
    this.memoryLabel = el("span", { className: "mem-label" });
    this.metrics = el("div", { className: "metrics" });
    this.range = el("span", { className: "range" });
    this.chips = el("div", { className: "chips" });
    this.tensors = el("div", { className: "tensors" });
    this.error = el("p", { className: "node-error" });
    this.root = el(
      "article",
      { className: `node ${role}`, dataset: { node: name, testid: `node-${name}` } },
      el("header", {}, el("span", { className: "role" }, role), el("h3", {}, name), this.status),
      this.facts,
      el("div", { className: "memory" }, el("div", { className: "bar" }, this.memoryFill), this.memoryLabel),
      this.metrics,
      el("div", { className: "layers" }, el("div", { className: "layers-head" }, this.range), this.chips),
      this.tensors,
      this.error,
    );
  }

  update(node, host, details) {
    this.details = details;
    const up = node.status === "up";
    this.root.classList.toggle("down", !up);
    this.root.classList.remove("stale");
    this.root.dataset.status = node.status;
    // Text is replaced only when it changes: a reader selecting an address or an error to copy keeps it.
    changeText(this.status, up ? "up" : "down");
    changeText(this.error, up ? "" : node.error || "not answering");

    const facts = [
      ["host", host],
      ["device", [node.device, node.hostname].filter(Boolean).join(" · ") || "unknown"],
      ["os", node.os || "unknown"],
      ...(this.root.classList.contains("master") ? [["runs", "embeddings, lm_head, sampling"]] : []),
    ];
    if (JSON.stringify(facts) !== this.factsKey) {
      this.factsKey = JSON.stringify(facts);
      this.facts.replaceChildren(...facts.flatMap(([label, value]) => fact(label, value)));
    }

    const memory = memoryOf(node);
    this.memoryFill.style.width = memory ? `${((100 * memory.used) / memory.total).toFixed(1)}%` : "0%";
    this.memoryFill.classList.toggle("high", Boolean(memory && memory.used / memory.total > 0.9));
    changeText(this.memoryLabel, memory ? `${formatBytes(memory.used)} of ${formatBytes(memory.total)} used` : "memory unknown");

    const figures = node.layers?.length ? [["forward", formatMs(measured(node.forward_ms))]] : [];
    // null: not known now (a worker that is down), so not shown rather than shown as 0.
    if (node.weights_bytes != null) figures.push(["weights", formatBytes(node.weights_bytes)]);
    if (node.kv_cache_bytes != null) figures.push(["kv cache", formatBytes(node.kv_cache_bytes)]);
    if (node.live_sequences != null) figures.push(["sequences", String(node.live_sequences)]);
    if (node.tflops) figures.push(["speed", formatFlops(node.tflops)]);
    if (JSON.stringify(figures) !== this.figuresKey) {
      this.figuresKey = JSON.stringify(figures);
      this.metrics.replaceChildren(
        ...figures.map(([label, value]) => el("span", { className: "metric" }, el("b", {}, value), ` ${label}`)),
      );
    }

    this.updateLayers(node.layers || []);
  }

  markStale() {
    this.root.classList.add("stale");
  }

  updateLayers(layers) {
    const key = layers.join(",");
    if (key === this.layerKey) return;
    this.layerKey = key;
    this.range.textContent = layers.length ? `layers ${layerRanges(layers)} (${layers.length})` : "no transformer layers";
    this.range.classList.toggle("muted", !layers.length);
    this.chips.replaceChildren(
      ...layers.map((layer) => {
        const chip = el("button", { type: "button", className: "chip", dataset: { layer } }, String(layerIndex(layer)));
        chip.addEventListener("click", () => this.toggle(layer));
        return chip;
      }),
    );
    this.renderTensors();
  }

  toggle(layer) {
    const key = `${this.name}|${layer}`;
    if (this.expanded.has(key)) this.expanded.delete(key);
    else this.expanded.add(key);
    this.renderTensors();
  }

  renderTensors() {
    const open = [];
    for (const chip of this.chips.children) {
      const isOpen = this.expanded.has(`${this.name}|${chip.dataset.layer}`);
      chip.setAttribute("aria-expanded", String(isOpen));
      if (isOpen) open.push(chip.dataset.layer);
    }
    this.tensors.replaceChildren(...open.map((layer) => tensorTable(layer, this.details[layer])));
    this.root.classList.toggle("expanded", open.length > 0);
  }
}

export function changeText(node, text) {
  if (node.textContent !== text) node.textContent = text;
}

/** A time the server reports as 0 until it has measured one: not measured yet, shown as "–" rather than 0.0 ms. */
function measured(ms) {
  return ms > 0 ? ms : NaN;
}

function formatFlops(tflops) {
  return tflops >= 1 ? `${tflops.toFixed(1)} TFLOP/s` : `${(tflops * 1000).toFixed(0)} GFLOP/s`;
}

/** "self_attn.q_proj.weight" → text pieces with a line-break opportunity after each dot. */
function breakable(name) {
  return name.split(/(?<=\.)/).flatMap((part, i) => (i ? [el("wbr"), part] : [part]));
}

function fact(label, value) {
  return [el("dt", {}, label), el("dd", { title: value }, value)];
}

function tensorTable(layer, detail) {
  const tensors = detail?.tensors ?? [];
  const rows = tensors.map((tensor) =>
    el(
      "tr",
      {},
      el("td", { className: "mono name", title: tensor.name }, ...breakable(tensor.short_name || tensor.name)),
      el("td", {}, tensor.dtype),
      el("td", { className: "mono" }, tensor.shape.join(" × ")),
      el("td", { className: "num" }, formatBytes(tensor.size_bytes)),
    ),
  );
  return el(
    "div",
    { className: "tensor-block", dataset: { layer } },
    el(
      "div",
      { className: "tensor-caption" },
      el("b", {}, layer),
      ` · ${tensors.length} tensors · ${formatBytes(detail?.total_bytes ?? 0)}`,
    ),
    el(
      "div",
      { className: "table-scroll" },
      el(
        "table",
        {},
        el("thead", {}, el("tr", {}, ...["tensor", "dtype", "shape", "size"].map((h) => el("th", {}, h)))),
        el("tbody", {}, ...rows),
      ),
    ),
  );
}

export function hop(worker) {
  const down = worker.status !== "up";
  // A worker that is down has no round trip now: its last one is not shown as if current (as its memory is not).
  const roundTrip = down ? NaN : measured(worker.round_trip_ms);
  const wire = Number.isNaN(roundTrip) ? NaN : (worker.hop_ms ?? NaN);
  return el(
    "div",
    { className: `hop${down ? " down" : ""}`, dataset: { to: worker.name } },
    el("span", { className: "arrow", ariaHidden: "true" }),
    el("b", {}, formatMs(roundTrip)),
    el("span", { className: "hop-label" }, "round trip"),
    el("span", { className: "hop-label muted" }, `${formatMs(wire)} wire`),
  );
}
