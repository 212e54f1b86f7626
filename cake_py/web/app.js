// The dashboard's entry point: view switching (#cluster / #chat) and the header's live figures.
// The views' links form a WAI-ARIA tablist: one tab stop (the selected tab, a "roving" tabindex), Left/Right move
// to the previous/next tab and Home/End to the first/last, each selecting its view as focus lands on it.

import { startCluster } from "./cluster.js";
import { startChat } from "./chat.js";
import { setText } from "./dom.js";

const VIEWS = ["cluster", "chat"];
const tabOf = (name) => document.getElementById(`tab-${name}`);
let fromTabKeys = false; // a view chosen with the tabs' keys keeps the keyboard on its tab

function showView() {
  const wanted = location.hash.slice(1);
  const view = VIEWS.includes(wanted) ? wanted : "cluster";
  for (const name of VIEWS) {
    document.getElementById(`view-${name}`).hidden = name !== view;
    tabOf(name).setAttribute("aria-selected", String(name === view));
    tabOf(name).tabIndex = name === view ? 0 : -1;
  }
  document.title = `cake · ${view}`;
  if (view === "chat" && !fromTabKeys) document.getElementById("prompt").focus();
  fromTabKeys = false;
}

function selectTab(name) {
  fromTabKeys = true;
  tabOf(name).focus();
  if (location.hash !== `#${name}`) location.hash = name; // showView runs on the hashchange
  else showView();
}

document.querySelector('[role="tablist"]').addEventListener("keydown", (event) => {
  const at = VIEWS.indexOf(event.target.dataset?.view);
  if (at < 0 || event.altKey || event.ctrlKey || event.metaKey) return;
  const last = VIEWS.length - 1;
  const to = {
    ArrowLeft: at === 0 ? last : at - 1,
    ArrowRight: at === last ? 0 : at + 1,
    Home: 0,
    End: last,
    " ": at, // a link answers Enter, not Space; a tab answers both
  }[event.key];
  if (to === undefined) return;
  event.preventDefault();
  selectTab(VIEWS[to]);
});

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
