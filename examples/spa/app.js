// The page: wires the form and the buttons of index.html to a gateway client.
import { createClient } from "./gateway-client.js";

const API_PATH = "/whoami";  // the protected API this page calls; it answers {"user", "roles"}
const PARALLEL_CALLS = 5;

const $ = (id) => document.getElementById(id);
const ui = {
  status: $("status"),
  signin: $("signin"),
  form: $("signin-form"),
  username: $("username"),
  password: $("password"),
  signinButton: $("signin-button"),
  signinError: $("signin-error"),
  app: $("app"),
  appTitle: $("app-title"),
  user: $("user"),
  callMany: $("call-many"),
  spoil: $("spoil-token"),
  signout: $("signout"),
  summary: $("batch-summary"),
  results: $("results"),
  refreshCount: $("refresh-count"),
};

const client = createClient({
  onRefresh({ count }) {
    ui.refreshCount.textContent = String(count);
  },
  onSignedOut() {
    const before = document.body.dataset.state;
    showSignIn(before === "signed-in" ? "Your session has ended. Please sign in again."
                                      : "Please sign in.");
  },
});

function announce(message) {
  ui.status.textContent = message;
}

function setState(state) {
  document.body.dataset.state = state;  // loading | signed-out | signed-in
  ui.signin.hidden = state !== "signed-out";
  ui.app.hidden = state !== "signed-in";
}

function showSignIn(message) {
  const wasShown = document.body.dataset.state === "signed-out";
  setState("signed-out");
  ui.user.textContent = "…";
  announce(message);
  if (!wasShown) ui.username.focus();
}

async function showApp(message) {
  setState("signed-in");
  clearResults();
  announce(message);
  ui.appTitle.focus();
  const response = await client.api(API_PATH, { headers: { Accept: "application/json" } });
  if (response.ok) {
    const body = await response.json();
    ui.user.textContent = `${body.user} (roles: ${body.roles || "none"})`;
  } else if (client.signedIn) {
    ui.user.textContent = "?";
    announce(`${message} But ${API_PATH} answered ${response.status}.`);
  }
}

// --- signing in and out ---------------------------------------------------------------

function signInFailure(error) {
  if (error instanceof TypeError) return "The gateway cannot be reached.";
  switch (error.status) {
    case 400: return "Enter a user name and a password.";
    case 401: return "The user name or password is incorrect.";
    case 403: return "The gateway refused a sign-in from this page's origin.";
    case 429: return `Too many attempts. Try again in ${error.retryAfter ?? "a few"} seconds.`;
    default: return `Signing in failed (${[error.status, error.code].filter(Boolean).join(" ")}).`;
  }
}

ui.form.addEventListener("submit", async (event) => {
  event.preventDefault();
  if (!ui.username.value || !ui.password.value) {
    showSignInError("Enter a user name and a password.");
    (ui.username.value ? ui.password : ui.username).focus();
    return;
  }
  ui.signinButton.disabled = true;
  announce("Signing in…");
  try {
    await client.login(ui.username.value, ui.password.value);
    ui.form.reset();
    showSignInError("");
    await showApp("Signed in.");
  } catch (error) {
    showSignInError(signInFailure(error));
    announce("");
    ui.password.focus();
  } finally {
    ui.signinButton.disabled = false;
  }
});

function showSignInError(message) {
  ui.signinError.textContent = message;
  ui.signinError.hidden = !message;
  for (const input of [ui.username, ui.password]) {
    if (message) input.setAttribute("aria-invalid", "true");
    else input.removeAttribute("aria-invalid");
  }
}

ui.signout.addEventListener("click", async () => {
  ui.signout.disabled = true;
  try {
    const ended = await client.logout();
    showSignIn(ended ? "Signed out." : "Signed out here; the gateway did not confirm it.");
  } catch {
    showSignIn("Signed out here; the gateway could not be reached to end the session.");
  } finally {
    ui.signout.disabled = false;
    clearResults();
  }
});

// --- calling the API ------------------------------------------------------------------

ui.spoil.addEventListener("click", () => {
  client.spoilToken();
  announce("The access token in memory is now invalid. The next calls will get 401 and refresh it.");
});

ui.callMany.addEventListener("click", async () => {
  ui.callMany.disabled = true;
  clearResults();
  ui.summary.dataset.state = "running";
  ui.summary.textContent = `${PARALLEL_CALLS} calls in flight…`;
  const refreshesBefore = client.refreshCount;
  const items = Array.from({ length: PARALLEL_CALLS }, (_, i) => resultItem(i + 1));
  ui.results.append(...items);
  const outcomes = await Promise.all(items.map(callInto));
  const ok = outcomes.filter(Boolean).length;
  const refreshes = client.refreshCount - refreshesBefore;
  Object.assign(ui.summary.dataset, { state: "done", calls: PARALLEL_CALLS, ok, refreshes });
  ui.summary.textContent = `${PARALLEL_CALLS} calls: ${ok} succeeded, `
    + `${refreshes} refresh${refreshes === 1 ? "" : "es"}.`;
  if (client.signedIn) announce(ui.summary.textContent);
  ui.callMany.disabled = false;
});

function resultItem(index) {
  const item = document.createElement("li");
  item.dataset.index = String(index);
  item.dataset.status = "pending";
  const code = document.createElement("span");
  code.className = "code";
  code.textContent = "…";
  const body = document.createElement("code");
  body.className = "body";
  item.append(`Call ${index}: `, code, " ", body);
  return item;
}

async function callInto(item) {
  let status, ok, text;
  try {
    const response = await client.api(API_PATH, { headers: { Accept: "application/json" } });
    [status, ok, text] = [String(response.status), response.ok, await response.text()];
  } catch (error) {
    [status, ok, text] = ["error", false, String(error)];
  }
  item.dataset.status = status;
  item.dataset.ok = String(ok);
  item.querySelector(".code").textContent = status;
  item.querySelector(".body").textContent = text.trim().slice(0, 300);
  return ok;
}

function clearResults() {
  ui.results.replaceChildren();
  ui.summary.textContent = "No calls yet.";
  for (const key of ["calls", "ok", "refreshes"]) delete ui.summary.dataset[key];
  ui.summary.dataset.state = "idle";
}

// --- start: a session from an earlier visit? -------------------------------------------

async function start() {
  announce("Looking for a session…");
  if (await client.refresh()) {
    await showApp("Welcome back: your session was renewed without signing in again.");
  } else if (document.body.dataset.state === "loading") {
    // not a 401 (that was onSignedOut): the gateway is down, or refused the request
    showSignIn("Could not check for a session. You can still sign in.");
  }
}

start();
