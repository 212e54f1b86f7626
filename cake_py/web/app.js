// The dashboard's entry point: view switching (#cluster / #chat) and the header's live figures.

import { startCluster } from "./cluster.js";
import { startChat } from "./chat.js";
import { setText } from "./dom.js";

const VIEWS = ["cluster", "chat"];

function showView() {
  const wanted = location.hash.slice(1);
  const view = VIEWS.includes(wanted) ? wanted : "cluster";
  for (const name of VIEWS) {
    document.getElementById(`view-${name}`).hidden = name !== view;
    document.getElementById(`tab-${name}`).setAttribute("aria-selected", String(name === view));
  }
  document.title = `cake · ${view}`;
  if (view === "chat") document.getElementById("prompt").focus();
}

/** `noModel`: what to show instead of a model name when none is served ("No model loaded", "Loading…"); with
 * neither (the master is not answering) the last name stays, as the cards do. */
function showLive(topology, noModel) {
  const live = topology?.live ?? {};
  setText("live-tps", live.tokens_per_second !== undefined ? live.tokens_per_second.toFixed(1) : "–");
  setText("live-in-flight", String(live.requests_in_flight ?? "–"));
  setText("live-queue", String(live.queue_depth ?? "–"));
  if (topology) setText("model-name", topology.model);
  else if (noModel) setText("model-name", noModel);
  document.getElementById("model-name").classList.toggle("none", !topology && Boolean(noModel));
}

window.addEventListener("hashchange", showView);
showView();
startCluster(showLive);
startChat();
