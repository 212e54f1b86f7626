// Small DOM and formatting helpers shared by the views. Server strings always go in as text, never as HTML.

/** Create an element: el("div", { className: "x", dataset: { k: "v" } }, child, "text", …). */
export function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (key === "dataset") Object.assign(node.dataset, value);
    else if (key.startsWith("aria") || key === "role" || key === "title") node.setAttribute(toAttr(key), value);
    else node[key] = value;
  }
  for (const child of children) {
    if (child !== null && child !== undefined) node.append(child);
  }
  return node;
}

function toAttr(key) {
  return key.startsWith("aria") ? `aria-${key.slice(4).toLowerCase()}` : key;
}

export function formatBytes(bytes) {
  if (!Number.isFinite(bytes) || bytes <= 0) return "0 B";
  const units = ["B", "KB", "MB", "GB", "TB"];
  const power = Math.min(Math.floor(Math.log(bytes) / Math.log(1024)), units.length - 1);
  const value = bytes / 1024 ** power;
  return `${value >= 100 || power === 0 ? value.toFixed(0) : value.toFixed(1)} ${units[power]}`;
}

export function formatMs(ms) {
  if (!Number.isFinite(ms)) return "–";
  return ms >= 100 ? `${ms.toFixed(0)} ms` : `${ms.toFixed(1)} ms`;
}

export function setText(id, text) {
  const node = document.getElementById(id);
  if (node && node.textContent !== text) node.textContent = text;
}

/** The Authorization header for an API key; an Error saying so for a key a header cannot carry (fetch refuses
 * anything past Latin-1 with a TypeError, which reads like a network failure: a pasted dash or quote is enough). */
export function bearerHeaders(key) {
  if (!key) return {};
  if (!/^[\x21-\x7e]+$/.test(key)) {
    throw new Error(
      "The saved API key has a character that cannot be sent (a typographic dash, quote or space pasted with it?): " +
        "type it again in Chat → Settings",
    );
  }
  return { Authorization: `Bearer ${key}` };
}

/** localStorage when the browser allows it; else (site data blocked: reading it throws) a map for this page, so the
 * views work and only forget the settings on reload. */
export const storage = (() => {
  const memory = new Map();
  let store = null;
  try {
    store = window.localStorage;
    store.getItem("cake.probe");
  } catch {
    store = null;
  }
  return {
    get: (key) => {
      try {
        return store ? store.getItem(key) : (memory.get(key) ?? null);
      } catch {
        return memory.get(key) ?? null;
      }
    },
    set: (key, value) => {
      memory.set(key, value);
      try {
        store?.setItem(key, value);
      } catch {
        // full or blocked: kept for this page only
      }
    },
  };
})();
