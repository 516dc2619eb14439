// A small browser client for gateway: sign in, call APIs with a bearer token, refresh it.
//
//   import { createClient } from "./gateway-client.js";
//   const client = createClient({ onSignedOut: () => showSignIn() });
//   if (!(await client.refresh())) showSignIn();     // a session from an earlier visit?
//   await client.login("alice", password);
//   const response = await client.api("/whoami");     // fetch(), plus Authorization: Bearer
//
// The access token lives in a variable of this module's closure and nowhere else: never in
// localStorage, sessionStorage or a cookie that script can read. The refresh token is an
// HttpOnly cookie set by the gateway; this code never sees it.
//
// When an API call answers 401, the client renews the access token with ONE refresh, shared
// by every call that failed meanwhile, and retries each of those calls once with the new
// token. If the refresh itself answers 401, the session is over: the client forgets the
// token and calls onSignedOut. It never refreshes in a loop.

/** A failed sign-in: `status` (401, 429, ...), the gateway's `code` and `retryAfter` (s). */
export class AuthError extends Error {
  constructor(status, code, description, retryAfter) {
    super(description || code || `HTTP ${status}`);
    this.name = "AuthError";
    this.status = status;
    this.code = code;
    this.retryAfter = retryAfter;
  }
}

/**
 * @param {object} [options]
 * @param {string} [options.loginPath]    POST {"username","password"} -> {"access_token",...}
 * @param {string} [options.refreshPath]  POST with the refresh cookie -> {"access_token",...}
 * @param {string} [options.logoutPath]   POST -> 204, the session ends, cookies cleared
 * @param {RequestCredentials} [options.credentials]  for the three calls above: "same-origin"
 *        when the page and the gateway share an origin; "include" when they do not (CORS)
 * @param {(info: {status: number, code: string}) => void} [options.onSignedOut]
 *        the session could not be renewed (the refresh answered 401)
 * @param {(info: {ok: boolean, status: number, count: number}) => void} [options.onRefresh]
 *        after every refresh request, successful or not
 * @param {typeof fetch} [options.fetch]
 */
export function createClient({
  loginPath = "/auth/login",
  refreshPath = "/auth/refresh",
  logoutPath = "/auth/logout",
  credentials = "same-origin",
  onSignedOut = () => {},
  onRefresh = () => {},
  fetch: fetchImpl = (...args) => globalThis.fetch(...args),
} = {}) {
  let token = null;       // the access token: memory only
  let generation = 0;     // +1 whenever `token` changes hands (sign-in, refresh, sign-out)
  let refreshing = null;  // the refresh in flight, which every caller joins
  let refreshCount = 0;   // refresh requests sent, for the page (and its tests) to show

  function setToken(value) {
    token = value;
    generation += 1;
  }

  async function readError(response) {
    try {
      const body = await response.json();
      return { code: String(body.error || ""), description: String(body.error_description || "") };
    } catch {
      return { code: "", description: "" };
    }
  }

  function authPost(path, init = {}) {
    return fetchImpl(path, { method: "POST", credentials, cache: "no-store", ...init });
  }

  /** Sign in. Resolves when signed in; rejects with an AuthError otherwise. */
  async function login(username, password) {
    const response = await authPost(loginPath, {
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ username, password }),
    });
    if (!response.ok) {
      const { code, description } = await readError(response);
      const retryAfter = Number(response.headers.get("Retry-After")) || undefined;
      throw new AuthError(response.status, code, description, retryAfter);
    }
    setToken((await response.json()).access_token);
  }

  /**
   * Exchange the refresh cookie for a new access token. Resolves true when there is one.
   * A refresh already in flight is joined, never repeated.
   */
  function refresh() {
    refreshing ??= doRefresh().finally(() => { refreshing = null; });
    return refreshing;
  }

  async function doRefresh() {
    refreshCount += 1;
    let response;
    try {
      response = await authPost(refreshPath);
    } catch {
      onRefresh({ ok: false, status: 0, count: refreshCount });  // offline: keep what we have
      return false;
    }
    if (response.ok) {
      setToken((await response.json()).access_token);
      onRefresh({ ok: true, status: response.status, count: refreshCount });
      return true;
    }
    onRefresh({ ok: false, status: response.status, count: refreshCount });
    if (response.status === 401) {  // no session, or it ended: sign in again
      const { code } = await readError(response);
      setToken(null);
      onSignedOut({ status: 401, code });
    }
    return false;
  }

  /**
   * A token newer than the one a failed call was sent with: the result of a refresh made
   * since (even one that has already finished), else of a new one. Null if there is none.
   */
  async function renewedAfter(sentGeneration) {
    if (refreshing === null && generation === sentGeneration) {
      await refresh();
    } else {
      await refreshing;  // join the refresh in flight (or, if none, use its result below)
    }
    return generation !== sentGeneration ? token : null;
  }

  function send(path, init, bearer) {
    const headers = new Headers(init.headers);
    if (bearer) headers.set("Authorization", `Bearer ${bearer}`);
    // The bearer token is the only credential: no cookies, so that what authenticates the
    // call is exactly the token held here (a caller may still pass `credentials`).
    return fetchImpl(path, { credentials: "omit", ...init, headers });
  }

  /**
   * fetch() with `Authorization: Bearer <token>`. On a 401, renew the token (see above) and
   * retry once. The body must be one fetch can send twice (a string, FormData, a Blob...).
   */
  async function api(path, init = {}) {
    if (refreshing) await refreshing;  // a token is on its way: wait for it, spare a 401
    const sentGeneration = generation;
    const response = await send(path, init, token);
    if (response.status !== 401) return response;
    const renewed = await renewedAfter(sentGeneration);
    if (!renewed) return response;  // no session: the caller sees the original 401
    return send(path, init, renewed);
  }

  /** Sign out: end the session at the gateway (which clears its cookies) and forget the token. */
  async function logout() {
    await refreshing;  // let a refresh in flight land first, or its cookies would outlive us
    const bearer = token;
    setToken(null);
    const response = await authPost(logoutPath, {
      headers: bearer ? { Authorization: `Bearer ${bearer}` } : {},
    });
    return response.ok;
  }

  return {
    login,
    refresh,
    api,
    logout,
    get signedIn() { return token !== null; },
    get refreshCount() { return refreshCount; },
    /** For demonstrations and tests: spoil the token in memory, as if it had expired. */
    spoilToken() {
      if (token !== null) token = `${token}x`;  // a bad signature; nothing else changes
    },
  };
}
