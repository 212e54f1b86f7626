// The cluster view: polls GET /api/v1/topology every second and draws the pipeline, master → workers, one card
// per node. Cards are created once and updated in place, so an expanded layer stays open across refreshes. With no
// model served (none loaded, or a switch under way) the model's cards and figures are cleared, the view says which,
// and the master and workers are shown as they are now (up or down, holding none of a model's layers).
// A master that does not answer is asked again after 1 s, then 2, 4, 8 and at most every 15 s (the banner counts
// down, and Retry now, the tab coming back or the window regaining focus asks at once); a hidden tab asks nothing.

import { bearerHeaders, el, formatBytes, formatMs, setText, storage } from "./dom.js";
import { changeText, hop, NodeCard } from "./node_card.js";

const POLL_MS = 1000;
const RETRY_FIRST_MS = 1000; // after a failed poll; doubled at each failure in a row, up to RETRY_MAX_MS
const RETRY_MAX_MS = 15_000;
const SLOW_MS = 2500; // no answer by then: the view says the master is not answering, and goes on waiting for it
const GIVE_UP_MS = 30_000; // still none: the request is dropped and asked again (a connection that died silently)
const LOGIN = "cake.topologyLogin"; // "basic" where a --ui-auth master answered the saved key with its Basic login

/** A tile's line under its figure, cut with an ellipsis where it is too long for the tile: its title holds it all. */
function setSub(id, text) {
  setText(id, text);
  document.getElementById(id).title = text;
}

async function problem(response) {
  try {
    const body = await response.json();
    const error = body.error ?? body.detail; // a string here; an object ({message}) from a proxy or another server
    return (typeof error === "string" ? error : error?.message) || `HTTP ${response.status}`;
  } catch {
    return `HTTP ${response.status}`;
  }
}

export function startCluster(onLive) {
  const pipeline = document.getElementById("pipeline");
  const banner = document.getElementById("cluster-banner");
  const summary = document.getElementById("summary");
  const cards = new Map();
  const expanded = new Set();
  let order = "";
  let model = null;

  const nodesOf = (topology) => [{ ...topology.master, name: topology.master.name || "master" }, ...topology.workers];
  // Cards are keyed by role and name: a worker may be called "master" too.
  const keyOf = (node, i) => `${i === 0 ? "master" : "worker"}:${node.name}`;

  /** Each node's card, created or updated; the cards of nodes no longer listed go. */
  function updateCards(nodes, details) {
    const seen = new Set();
    nodes.forEach((node, i) => {
      const key = keyOf(node, i);
      seen.add(key);
      if (!cards.has(key)) cards.set(key, new NodeCard(node.name, i === 0 ? "master" : "worker", expanded));
      cards.get(key).update(node, i === 0 ? location.host : node.host, details);
    });
    for (const key of [...cards.keys()]) if (!seen.has(key)) cards.delete(key);
  }

  function render(topology) {
    if (topology.model_id !== model) {
      // Another model (a /models/load): its layers and tensors differ, so every card starts afresh.
      model = topology.model_id;
      cards.clear();
      expanded.clear();
      order = "";
    }
    const nodes = nodesOf(topology);
    updateCards(nodes, topology.layer_details ?? {});

    // Rebuild the pipeline only when its shape changes; the hops between cards are small, so they are redrawn.
    const shape = nodes.map(keyOf).join(">");
    const children = [cards.get(keyOf(nodes[0], 0)).root];
    nodes.slice(1).forEach((worker, i) => children.push(hop(worker), cards.get(keyOf(worker, i + 1)).root));
    if (shape !== order) {
      order = shape;
      pipeline.replaceChildren(...children);
    } else {
      pipeline.querySelectorAll(".hop").forEach((old, i) => old.replaceWith(children[2 * i + 1]));
    }

    const live = topology.live ?? {};
    const up = nodes.filter((node) => node.status === "up").length; // the master too: its engine may have died
    setText("sum-model", topology.model);
    setSub("sum-dtype", `${topology.dtype} · ${topology.model_id}`); // the dtype first: a long id is what is cut
    setText("sum-layers", String(topology.num_layers));
    // --failover-after: configured workers the served placement goes without.
    const leftOut = (topology.left_out ?? []).map((worker) => worker.name);
    const leftOutText = leftOut.length ? ` · left out: ${leftOut.join(", ")}` : "";
    setSub("sum-nodes", `on ${nodes.length} ${nodes.length === 1 ? "node" : "nodes"} · ${up} up${leftOutText}`);
    setText("sum-weights", formatBytes(topology.memory_bytes));
    setText("sum-layer-size", `${formatBytes(topology.layer_size_bytes)} per layer`);
    setText("sum-tps", (live.tokens_per_second ?? 0).toFixed(1));
    setText("sum-step", `last step ${formatMs(live.last_step_ms ?? NaN)}`);
    setText("sum-in-flight", String(live.requests_in_flight ?? 0));
    setText("sum-queue", `${live.queue_depth ?? 0} queued`);
    setText("sum-total", String(live.requests_total ?? 0));
    setText("sum-tokens", `${live.tokens_generated ?? 0} tokens generated`);
  }

  // The master answers but serves no model: none is loaded, or one is being loaded or unloaded (the topology's
  // `state`; an older master answers 404 or 503, without its nodes). What was drawn belongs to a model that is gone,
  // so those cards and figures go, not just dim; the nodes are drawn again as they are now, holding no layers.
  function showNoModel(state, topology = null) {
    if (model !== null || !order.startsWith("none:")) {
      model = null;
      cards.clear();
      expanded.clear();
    }
    const nodes = topology ? nodesOf(topology) : [];
    updateCards(nodes, {});
    // Redrawn when what it says or who is listed changes; a model drawn since resets `order`.
    const shown = `none:${state.label}:${state.reason}:${nodes.map(keyOf).join(">")}`;
    if (order !== shown) {
      order = shown;
      pipeline.replaceChildren(
        el("p", { className: "no-model", dataset: { testid: "no-model" } }, el("b", {}, state.label), ` ${state.reason}`),
        ...nodes.map((node, i) => cards.get(keyOf(node, i)).root),
      );
    }
    setText("sum-model", state.label);
    setSub("sum-dtype", state.reason);
    for (const id of ["sum-layers", "sum-weights", "sum-tps", "sum-in-flight", "sum-total"]) setText(id, "–");
    const up = nodes.filter((node) => node.status === "up").length;
    setSub("sum-nodes", nodes.length ? `${nodes.length} ${nodes.length === 1 ? "node" : "nodes"} · ${up} up` : "");
    for (const id of ["sum-layer-size", "sum-step", "sum-queue", "sum-tokens"]) setText(id, "");
  }

  // The banner: a message (the live region's text, set only when it changes: a live region re-set is read out again),
  // then what happens next (a countdown, hidden from screen readers so it is not read out every second) and a button.
  const bannerMessage = document.createTextNode("");
  const bannerNext = el("span", { className: "banner-next", ariaHidden: "true" });
  const retryButton = el("button", { type: "button", className: "banner-action", hidden: true }, "Retry now");
  banner.replaceChildren(bannerMessage, " ", bannerNext, " ", retryButton);

  function setConnected(ok, message, next = "") {
    const connection = document.getElementById("connection");
    connection.className = `conn ${ok ? "ok" : "lost"}`;
    connection.title = ok ? "topology: live" : `topology: ${message}`;
    banner.hidden = ok;
    summary.classList.toggle("stale", !ok); // its figures are the last ones heard, as the cards' are
    if (!ok) {
      changeText(bannerMessage, `${message}.`);
      changeText(bannerNext, next);
      for (const card of cards.values()) card.markStale();
    }
  }

  // A master with --api-key (and no --ui-auth) guards the topology with the same key as the API: the one saved in
  // the chat's settings goes from the first poll (sent only once a 401 asked for it, it cost a 401 at every load).
  // With --ui-auth the browser's Basic login is used, which an Authorization header of ours replaces: a Basic
  // challenge to a poll that sent the key says so, and the key stops going, remembered in this browser so that later
  // loads do not try it first (a Bearer challenge turns it back on).
  let bearer = storage.get(LOGIN) !== "basic";

  function setBearer(on) {
    bearer = on;
    const login = on ? "bearer" : "basic";
    if (storage.get(LOGIN) !== login) storage.set(LOGIN, login);
  }

  // A slow answer is still an answer: a master that takes longer than SLOW_MS (busy, or a big model's tensor list)
  // was dropped at that point and asked again, so it was never drawn and always "not answering".
  // Resolves to {topology}, {noModel} (with the topology's nodes, from a master that lists them) or {error}.
  async function fetchTopology() {
    const slow = setTimeout(() => setConnected(false, "The master is not answering", "Waiting for it…"), SLOW_MS);
    try {
      const key = (storage.get("cake.apiKey") ?? "").trim();
      let headers = {};
      let unsendable = null; // a saved key no header can carry: said if the master asks for the key, else not sent
      try {
        if (bearer) headers = bearerHeaders(key);
      } catch (error) {
        unsendable = error;
      }
      const sent = "Authorization" in headers;
      const response = await fetch("/api/v1/topology", {
        cache: "no-store",
        headers,
        signal: AbortSignal.timeout(GIVE_UP_MS),
      });
      const challenge = response.status === 401 ? (response.headers.get("WWW-Authenticate") ?? "") : null;
      if (challenge?.startsWith("Bearer")) {
        if (unsendable) throw unsendable;
        const retry = !bearer && key;
        setBearer(true);
        if (retry) return await fetchTopology();
        throw new Error(`The topology needs the API key: enter it in Chat → Settings (${await problem(response)})`);
      }
      if (challenge !== null && sent) {
        setBearer(false); // --ui-auth: the browser's login, not the key
        return await fetchTopology();
      }
      if (response.status === 404 || response.status === 503) {
        const label = response.status === 404 ? "No model loaded" : "Loading…";
        return { noModel: { label, reason: await problem(response) } };
      }
      if (!response.ok) throw new Error(`The topology is unavailable: ${await problem(response)}`);
      const text = await response.text(); // a connection cut here is a TypeError: not answering, as above
      let topology;
      try {
        topology = JSON.parse(text);
      } catch {
        throw new Error(`The master's topology is not JSON (${text.slice(0, 60) || "an empty answer"})`);
      }
      if (typeof topology !== "object" || topology === null || Array.isArray(topology)) {
        throw new Error(`The master's topology is not a JSON object (${text.slice(0, 60)})`);
      }
      if (topology.state && topology.state !== "serving") {
        const label = topology.state === "switching" ? "Loading…" : "No model loaded";
        return { noModel: { label, reason: topology.reason ?? "" }, topology };
      }
      return { topology };
    } catch (error) {
      const unreachable = error.name === "TimeoutError" || error instanceof TypeError; // no answer at all
      return { error: unreachable ? "The master is not answering" : error.message };
    } finally {
      clearTimeout(slow);
    }
  }

  // One request at a time: the next is planned when an answer (or a failure) comes, never on a fixed clock, so a
  // slow master is never asked twice at once.
  let timer = 0; // the planned poll
  let asking = false; // a request is in flight
  let failures = 0; // failed polls in a row
  let retryAt = 0; // when the planned retry runs (Date.now() scale), for the countdown
  let countdown = 0;

  function plan(ms) {
    clearTimeout(timer);
    timer = setTimeout(poll, ms);
  }

  function showRetry(message) {
    const seconds = Math.max(1, Math.ceil((retryAt - Date.now()) / 1000));
    setConnected(false, message, `Retrying in ${seconds} s.`);
    retryButton.hidden = false;
  }

  async function poll() {
    clearTimeout(timer);
    clearInterval(countdown);
    timer = 0;
    if (asking || document.hidden) return; // the answer plans the next poll; a tab shown again polls at once
    asking = true;
    retryButton.hidden = true;
    if (failures) changeText(bannerNext, "Retrying now…");
    const answer = await fetchTopology();
    asking = false;
    if (answer.error) {
      // Asked again later and later while it fails: a master that is down is not asked every second for ever.
      failures += 1;
      const wait = Math.min(RETRY_FIRST_MS * 2 ** (failures - 1), RETRY_MAX_MS);
      retryAt = Date.now() + wait;
      showRetry(answer.error);
      countdown = setInterval(() => showRetry(answer.error), 1000);
      plan(wait);
      onLive(null);
      // The live figures are not known now: "–", as in the header (the rest of the summary dims, as the cards do).
      for (const id of ["sum-tps", "sum-in-flight"]) setText(id, "–");
      for (const id of ["sum-step", "sum-queue"]) setText(id, "");
      return;
    }
    failures = 0;
    plan(POLL_MS);
    try {
      if (answer.noModel) showNoModel(answer.noModel, answer.topology);
      else render(answer.topology);
    } catch (error) {
      // An answer this page cannot read (another server's JSON, a field of the wrong type): said, not thrown.
      setConnected(false, `The master's topology could not be read (${error.message})`, "Asking again every second.");
      return;
    }
    setConnected(true);
    onLive(answer.noModel ? null : answer.topology, answer.noModel?.label);
  }

  /** Asks now rather than at the planned time, when the master is failing (a person is waiting to see it back). */
  function retryNow() {
    if (failures && !asking) poll();
  }

  retryButton.addEventListener("click", poll);
  // A hidden tab polls nothing (its planned poll finds it hidden and stops); shown again, it asks at once.
  document.addEventListener("visibilitychange", () => {
    if (!document.hidden && !asking) poll();
  });
  window.addEventListener("focus", retryNow);
  window.addEventListener("online", retryNow);
  document.getElementById("api-key").addEventListener("change", retryNow); // the key the topology asked for
  window.addEventListener("hashchange", () => {
    if (location.hash !== "#chat") retryNow(); // back to the cluster view
  });

  poll();
}
