// The chat view: streams POST /v1/chat/completions (SSE over fetch), keeps the conversation in memory, and stops a
// reply by aborting the fetch (the server cancels the sequence when the connection closes). Model output goes into
// the page as text only (text nodes, textContent), never as markup.

import { bearerHeaders, el, storage } from "./dom.js";

const FOLLOW_SLACK_PX = 40; // this close to the bottom of the conversation counts as reading its end
const STORAGE = { apiKey: "cake.apiKey", system: "cake.systemPrompt", temperature: "cake.temperature", maxTokens: "cake.maxTokens" };

// Why a reply failed, told apart: the connection (fetch and the stream reader fail with a TypeError, "Failed to
// fetch" or "network error", when it does) or what the server sent (an event this page cannot read).
class ConnectionLost extends Error {}
class MalformedReply extends Error {}

/** Yields the `data:` payload of each server-sent event of a response body. */
export async function* sseEvents(body) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  try {
    for (;;) {
      const { value, done } = await reader.read().catch((error) => {
        throw error instanceof TypeError ? new ConnectionLost(error.message) : error;
      });
      if (done) return;
      buffer += value;
      let end;
      while ((end = buffer.search(/\r?\n\r?\n/)) >= 0) {
        const event = buffer.slice(0, end);
        buffer = buffer.slice(end).replace(/^\r?\n\r?\n/, "");
        const data = event
          .split(/\r?\n/)
          .filter((line) => line.startsWith("data:"))
          .map((line) => line.slice(5).replace(/^ /, ""))
          .join("\n");
        if (data) yield data;
      }
    }
  } finally {
    reader.cancel().catch(() => {});
  }
}

/** The message of an error answer; `tooLong`: what to do about a conversation past the model's context. */
async function errorMessage(response, tooLong) {
  const status = `HTTP ${response.status}${response.statusText ? ` ${response.statusText}` : ""}`;
  let text = "";
  try {
    text = (await response.text()).trim();
    const body = JSON.parse(text);
    const error = body.error ?? body.detail;
    let message = typeof error === "string" ? error : error?.message;
    if (!message && error != null) message = `${status}: ${JSON.stringify(error).slice(0, 300)}`;
    if (body.code === "context_length_exceeded") return `${message}. ${tooLong}`;
    return message || status;
  } catch {
    // Not JSON (a proxy's page or plain text): its text, unless it is HTML, with the status.
    return text && !text.startsWith("<") ? `${status}: ${text.slice(0, 300)}` : status;
  }
}

const CONNECTION_LOST =
  "The server stopped answering (the connection was lost): check that cake serve is running, then send again";

/** A value's kind, for saying what was wrong with it: "null", "an array", "a number"… */
function kindOf(value) {
  if (value === null) return "null";
  if (Array.isArray(value)) return "an array";
  return typeof value === "object" ? "an object" : `a ${typeof value}`;
}

function malformed(what, data) {
  const shown = data.length > 80 ? `${data.slice(0, 80)}…` : data;
  return new MalformedReply(`The server sent a malformed reply: ${what} (data: ${shown})`);
}

/** One streamed chunk of a chat completion, checked for the fields the page reads: each is absent, null or of the
 * type OpenAI's stream gives it; anything else is a MalformedReply naming the field. */
function readChunk(data) {
  let chunk;
  try {
    chunk = JSON.parse(data);
  } catch {
    throw malformed("an event is not JSON", data);
  }
  if (kindOf(chunk) !== "an object") throw malformed(`an event is ${kindOf(chunk)}, not a JSON object`, data);
  const check = (value, kind, name) => {
    if (value != null && kindOf(value) !== kind) throw malformed(`${name} is ${kindOf(value)}, not ${kind}`, data);
    return value;
  };
  check(chunk.choices, "an array", "choices");
  const choice = check(chunk.choices?.[0], "an object", "choices[0]");
  check(choice?.delta, "an object", "delta");
  check(choice?.delta?.content, "a string", "delta.content");
  check(choice?.delta?.reasoning_content, "a string", "delta.reasoning_content");
  check(choice?.finish_reason, "a string", "finish_reason");
  check(chunk.usage, "an object", "usage");
  check(chunk.usage?.completion_tokens, "a number", "usage.completion_tokens");
  return chunk;
}

export function startChat() {
  const $ = (id) => document.getElementById(id);
  const form = $("composer");
  const prompt = $("prompt");
  const send = $("send");
  const stop = $("stop");
  const list = $("messages");
  const errorBanner = $("chat-error");
  const fields = { apiKey: $("api-key"), system: $("system-prompt"), temperature: $("temperature"), maxTokens: $("max-tokens") };

  const conversation = []; // [{role, content}] without the system prompt, which is read fresh on every send
  let controller = null;
  let epoch = 0; // bumped by "New chat", so a reply still unwinding does not write into the new conversation

  if (matchMedia("(max-width: 860px)").matches) $("settings").open = false; // phones: the conversation first

  for (const [name, input] of Object.entries(fields)) {
    const saved = storage.get(STORAGE[name]);
    if (saved !== null) input.value = saved;
    input.addEventListener("input", () => storage.set(STORAGE[name], input.value));
  }
  // Another tab saved a setting (the API key, say): this one sends it too.
  window.addEventListener("storage", (event) => {
    const name = Object.keys(STORAGE).find((key) => STORAGE[key] === event.key);
    if (name && event.newValue !== null && fields[name] !== document.activeElement) fields[name].value = event.newValue;
  });

  function setState(text) {
    $("chat-state").textContent = text;
  }

  /** Tokens so far, and the rate between the first and the last token (not meaningful for fewer than two, or
   * for tokens that came within a few milliseconds: then "–"). */
  function showFigures(tokens, firstTokenAt, lastTokenAt) {
    $("chat-tokens").textContent = String(tokens);
    const seconds = firstTokenAt === null ? 0 : (lastTokenAt - firstTokenAt) / 1000;
    $("chat-tps").textContent = tokens >= 2 && seconds >= 0.05 ? ((tokens - 1) / seconds).toFixed(1) : "–";
  }

  function showError(message) {
    errorBanner.textContent = message;
    errorBanner.hidden = !message;
  }

  function addMessage(role, text) {
    $("chat-empty").hidden = true;
    const body = document.createTextNode(text); // a reply grows by appending to it
    const content = el("div", { className: "content", dir: "auto" }, body); // right-to-left text reads as such
    const meta = el("div", { className: "meta" });
    const message = el(
      "div",
      { className: `message ${role}`, dataset: { testid: `${role}-message` } },
      el("div", { className: "who" }, role === "user" ? "You" : "Model"),
      content,
      meta,
    );
    list.append(message);
    list.scrollTop = list.scrollHeight;
    return { message, content, meta, body, thinking: null };
  }

  /** A reasoning model's thinking (`reasoning_content`): shown in its own block above the answer, never sent back.
   * Its text node, to append to. */
  function thinkingOf(reply) {
    if (!reply.thinking) {
      reply.thinking = document.createTextNode("");
      const thought = el("div", { className: "thought", dir: "auto" }, reply.thinking);
      reply.content.before(el("details", { className: "thinking", open: true }, el("summary", {}, "Thinking"), thought));
    }
    return reply.thinking;
  }

  /** Appends to a text node what `text` has past it (one text node per reply: re-setting the whole text each time
   * made the browser lay all of it out again). */
  function grow(node, text) {
    if (text.length > node.length) node.appendData(text.slice(node.length));
  }

  // The message box stays editable during a reply (the next message can be drafted; sending waits for the reply),
  // and focus comes back to it only from nowhere: a reader typing in the settings keeps typing there.
  function setBusy(busy) {
    const sendHadFocus = document.activeElement === send;
    const stopHadFocus = document.activeElement === stop;
    send.hidden = busy;
    stop.hidden = !busy;
    if (!busy) $("composer-hint").hidden = true;
    list.setAttribute("aria-busy", String(busy)); // a screen reader reads the reply once, not at every token
    if (busy && sendHadFocus) stop.focus(); // Send hides: the keyboard goes to the button that takes its place
    if (!busy && (stopHadFocus || document.activeElement === document.body || document.activeElement === null)) {
      prompt.focus();
    }
  }

  function request() {
    const messages = [...conversation];
    const system = fields.system.value.trim();
    if (system) messages.unshift({ role: "system", content: system });
    const body = { messages, stream: true };
    const temperature = Number.parseFloat(fields.temperature.value);
    const maxTokens = Number.parseInt(fields.maxTokens.value, 10);
    if (Number.isFinite(temperature)) body.temperature = temperature;
    if (Number.isFinite(maxTokens)) body.max_tokens = maxTokens;
    const headers = { "Content-Type": "application/json", ...bearerHeaders(fields.apiKey.value.trim()) };
    return { headers, body: JSON.stringify(body) };
  }

  /** What to shorten when the request does not fit in the model's context. A New chat helps only where there
   * are earlier turns to leave behind: with one, it would send the same system prompt and message again. */
  function contextAdvice() {
    if (conversation.length > 1) return "Start a New chat, or a shorter conversation";
    if (fields.system.value.trim()) return "Shorten the system prompt (in Settings) or this message";
    return "Shorten this message";
  }

  async function ask(text) {
    showError("");
    conversation.push({ role: "user", content: text });
    const question = addMessage("user", text);
    const reply = addMessage("assistant", "");
    reply.message.classList.add("streaming");
    reply.message.dataset.state = "streaming";
    controller = new AbortController();
    setBusy(true);
    setState("waiting for the first token…");
    showFigures(0, null, null);

    let answer = "";
    let thought = "";
    let tokens = 0;
    let firstTokenAt = null;
    let lastTokenAt = null;
    let finish = null;
    let ended = false; // [DONE] or a finish reason came: a stream that closes without either was cut off
    let outcome = "done";
    const asked = epoch;
    // Drawn at most once a frame, however many deltas came meanwhile: drawing (and measuring) at every delta laid the
    // whole reply out each time, so a long reply that came in a burst froze the tab for minutes.
    let frame = 0;
    // Follow the reply only for a reader already at its end: one who scrolled up to read stays there.
    const atEnd = () => list.scrollHeight - list.scrollTop - list.clientHeight <= FOLLOW_SLACK_PX;
    const draw = () => {
      frame = 0;
      if (asked !== epoch) return; // "New chat" came: its figures and state are not this reply's
      const following = atEnd();
      if (thought) grow(thinkingOf(reply), thought);
      grow(reply.body, answer);
      if (following) list.scrollTop = list.scrollHeight;
      if (tokens) setState(answer ? "streaming" : "thinking");
      showFigures(tokens, firstTokenAt, lastTokenAt);
    };
    try {
      const { headers, body } = request();
      const response = await fetch("/v1/chat/completions", { method: "POST", headers, body, signal: controller.signal })
        .catch((error) => {
          throw error instanceof TypeError ? new ConnectionLost(error.message) : error;
        });
      if (!response.ok) {
        const message = await errorMessage(response, contextAdvice());
        if (response.status === 401) {
          showKeyField();
          throw new Error(`${message}: enter the server's API key in Settings`);
        }
        throw new Error(message);
      }
      for await (const data of sseEvents(response.body)) {
        // Nothing follows [DONE] but the body's end, which is read rather than cancelled: leaving the loop cancels
        // the body, and a body cancelled before its end is a failed request (net::ERR_ABORTED) in DevTools.
        if (ended) continue;
        if (data === "[DONE]") {
          ended = true;
          continue;
        }
        const chunk = readChunk(data);
        if (chunk.error) {
          const { error } = chunk;
          throw new Error(typeof error === "string" ? error : (error.message ?? JSON.stringify(error).slice(0, 300)));
        }
        const choice = chunk.choices?.[0];
        const delta = choice?.delta?.content;
        const reasoning = choice?.delta?.reasoning_content;
        if (delta || reasoning) {
          lastTokenAt = performance.now();
          firstTokenAt ??= lastTokenAt;
          tokens += 1; // an estimate until the finish chunk's usage gives the real count
          thought += reasoning ?? "";
          answer += delta ?? "";
          frame ||= requestAnimationFrame(draw);
        }
        if (choice?.finish_reason) finish = choice.finish_reason;
        if (chunk.usage) tokens = chunk.usage.completion_tokens;
      }
      if (!ended && finish === null) throw new Error("The reply was cut off: the connection closed before it ended");
      if (finish === "length") outcome = "max tokens";
    } catch (error) {
      if (error.name === "AbortError") outcome = "stopped";
      else {
        outcome = "error";
        if (asked === epoch) showError(error instanceof ConnectionLost ? CONNECTION_LOST : error.message);
      }
    } finally {
      // Measured before the last text and the status line below it lengthen the conversation: drawing scrolled to
      // the end of the text, and the status line, written after, was left half below the list.
      const following = atEnd();
      cancelAnimationFrame(frame);
      draw(); // what came since the last frame
      controller = null;
      reply.message.classList.remove("streaming");
      reply.message.dataset.state = outcome;
      if (asked === epoch) {
        // A reply stopped by "New chat" leaves the new conversation's figures and state alone.
        showFigures(tokens, firstTokenAt, lastTokenAt);
        reply.meta.textContent = `${tokens} tokens · ${$("chat-tps").textContent} tok/s · ${outcome}`;
        if (answer) conversation.push({ role: "assistant", content: answer });
        else {
          // The question got no answer: it leaves the context of the next one, and the page shows it the same way.
          // Its text comes back to the message box (unless a new draft is there) to send again.
          conversation.pop();
          question.message.dataset.state = "unsent";
          question.meta.textContent = thought
            ? "no answer came after the thinking, so it is not part of the conversation"
            : "not sent: no answer came, so it is not part of the conversation";
          if (outcome === "error" && !prompt.value.trim()) prompt.value = text;
        }
        if (following) list.scrollTop = list.scrollHeight;
        setState(outcome);
      }
      setBusy(false);
    }
  }

  /** Where a key the server refused, or one that cannot be sent, is fixed: Settings open, the key field focused. */
  function showKeyField() {
    $("settings").open = true;
    fields.apiKey.focus();
  }

  /** Whether the settings hold values the page may send; else the first bad one is shown, with why. */
  function settingsValid() {
    for (const input of [fields.temperature, fields.maxTokens]) {
      if (!input.checkValidity()) { // a number the field cannot read ("1e") is invalid too, while its value reads ""
        $("settings").open = true;
        showError(`${input.labels[0]?.firstChild?.textContent.trim() ?? input.id}: ${input.validationMessage}`);
        input.focus();
        return false;
      }
    }
    try {
      bearerHeaders(fields.apiKey.value.trim()); // a key no header can carry (a pasted typographic dash, say)
    } catch (error) {
      showError(error.message);
      showKeyField();
      return false;
    }
    return true;
  }

  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const text = prompt.value.trim();
    // Sending during a reply would be silently nothing: say why the message stays in the box.
    if (text && controller) $("composer-hint").hidden = false;
    if (!text || controller || !settingsValid()) return;
    prompt.value = "";
    ask(text);
  });
  prompt.addEventListener("keydown", (event) => {
    if (event.key === "Escape" && controller) {
      event.preventDefault();
      controller.abort();
    } else if (event.key === "Enter" && !event.shiftKey && !event.isComposing && event.keyCode !== 229) {
      event.preventDefault();
      form.requestSubmit();
    }
  });
  stop.addEventListener("click", () => controller?.abort());
  $("new-chat").addEventListener("click", () => {
    controller?.abort();
    epoch += 1;
    conversation.length = 0;
    list.replaceChildren($("chat-empty"));
    $("chat-empty").hidden = false;
    showError("");
    showFigures(0, null, null);
    setState("idle");
  });
}
