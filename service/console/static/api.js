// The service's REST API, addressed relative to the page so the console also works when a
// proxy serves the service under a path prefix. When the service has API keys configured, the
// key typed into the console goes with every request; it is kept for this tab only.

const V1 = new URL("../v1/", document.baseURI);
const KEY_STORAGE = "edgeharvest.console.api-key";

export class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }

  // 401 (no or a wrong key) or 403 (a key without the role): a key would fix it.
  get needsKey() {
    return this.status === 401 || this.status === 403;
  }
}

export function apiKey() {
  return sessionStorage.getItem(KEY_STORAGE) ?? "";
}

export function setApiKey(key) {
  if (key) sessionStorage.setItem(KEY_STORAGE, key);
  else sessionStorage.removeItem(KEY_STORAGE);
}

async function send(path, options = {}) {
  const headers = { Accept: "application/json", ...options.headers };
  const key = apiKey();
  if (key) headers.Authorization = `Bearer ${key}`;
  let response;
  try {
    response = await fetch(new URL(path, V1), { ...options, headers });
  } catch (error) {
    throw new ApiError(0, `cannot reach the service (${error.message})`);
  }
  if (!response.ok) {
    let message = `${response.status} ${response.statusText}`;
    try {
      message = (await response.json()).error ?? message;
    } catch {
      // not a JSON error body: keep the status line
    }
    throw new ApiError(response.status, message);
  }
  return response;
}

async function json(response) {
  const text = await response.text();
  return text ? JSON.parse(text) : null;
}

export async function getJson(path, params = {}) {
  const query = new URLSearchParams(params).toString();
  return json(await send(query ? `${path}?${query}` : path));
}

export async function postJson(path, body) {
  const options = { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) };
  return json(await send(path, options));
}

// Binary content (an item's PNG) through the same authenticated request as the rest; an <img>
// pointing at the URL could not send the key.
export async function getBlob(path) {
  return (await send(path, { headers: { Accept: "*/*" } })).blob();
}

export function loadCatalog() {
  return getJson("console/models");
}

// `version` empty means the latest version, as the API's unversioned paths do.
export function modelPath(model, version) {
  const name = encodeURIComponent(model);
  return version ? `models/${name}/versions/${encodeURIComponent(version)}` : `models/${name}`;
}
