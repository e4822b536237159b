// Shared by every page (imported by each page module; a module runs once however often it is
// imported). Copy-to-clipboard buttons:
//   <button type="button" data-copy-target="#config-json">Copy</button>
//   <span data-copy-status aria-live="polite"></span>
// The status element is the first [data-copy-status] in the button's parent (or the button's
// next sibling). Delegated from the document, so buttons that htmx swaps in work too.

const CLEAR_AFTER_MS = 2500;
const timers = new WeakMap();

function statusFor(button) {
  return (
    button.parentElement?.querySelector("[data-copy-status]") ??
    (button.nextElementSibling?.hasAttribute("data-copy-status") ? button.nextElementSibling : null)
  );
}

/**
 * Copies `text`: the async Clipboard API where the page may use it (a secure context, granted,
 * focused), else — or when it refuses or does not answer within a second — the old
 * select-and-execCommand way on a hidden textarea.
 */
export async function copyText(text) {
  if (navigator.clipboard && globalThis.isSecureContext) {
    try {
      await Promise.race([
        navigator.clipboard.writeText(text),
        new Promise((_, reject) => setTimeout(() => reject(new Error("no answer")), 1000)),
      ]);
      return;
    } catch {
      // fall through
    }
  }
  legacyCopy(text);
}

function legacyCopy(text) {
  const area = document.createElement("textarea");
  area.value = text;
  area.setAttribute("readonly", "");
  area.style.position = "fixed";
  area.style.top = "-1000px";
  area.style.opacity = "0";
  document.body.append(area);
  area.select();
  try {
    if (!document.execCommand("copy")) throw new Error("copy refused");
  } finally {
    area.remove();
  }
}

function say(status, text) {
  if (!status) return;
  status.textContent = text;
  clearTimeout(timers.get(status));
  timers.set(
    status,
    setTimeout(() => {
      status.textContent = "";
    }, CLEAR_AFTER_MS),
  );
}

async function onClick(event) {
  const button =
    event.target instanceof Element ? event.target.closest("[data-copy-target]") : null;
  if (!button) return;
  event.preventDefault();
  const status = statusFor(button);
  let target = null;
  try {
    target = document.querySelector(button.dataset.copyTarget);
  } catch {
    // not a valid selector
  }
  if (!target) {
    say(status, "Nothing to copy");
    return;
  }
  const text =
    "value" in target && typeof target.value === "string" ? target.value : target.textContent;
  try {
    await copyText(text ?? "");
    say(status, "Copied");
  } catch {
    say(status, "Copy failed: select the text and press Ctrl+C");
  }
}

if (!globalThis.__kdlabCommon) {
  globalThis.__kdlabCommon = true;
  document.addEventListener("click", onClick);
}
