// The sagaflow operator dashboard: plain DOM, no framework, no network but this origin.
// Every value from the API is put in the page as text (textContent), never as markup.
'use strict';

const TOKEN_KEY = 'sagaflow.adminToken';
const OPERATOR_KEY = 'sagaflow.operator';
const OPERATOR_HEADER = 'x-sagaflow-operator';
const REFRESH_MS = 2000;
const PAGE_SIZE = 15;
const STATUSES = ['running', 'compensating', 'completed', 'compensated', 'stuck'];
const SVG_NS = 'http://www.w3.org/2000/svg';

const EVENT_LABELS = {
  started: 'saga started',
  step_started: 'action started',
  step_completed: 'action completed',
  step_failed: 'action failed — rollback starts',
  step_compensated: 'compensated',
  compensation_gave_up: 'compensation gave up — stuck',
  retry_compensation: 'operator retried the compensation',
  aborted: 'operator aborted the saga — rollback starts',
  resolved: 'operator settled the compensation by hand',
  callback_delivered: 'callback delivered',
  callback_failed: 'callback failed',
  branches_joined: 'branches merged',
};

const app = {
  flows: [],
  flowsByFacade: new Map(),
  // Unfinished sagas per flow version (`/api/versions`).
  versions: [],
  timer: null,
  // Cursors of the pages shown before the current one; the current page's own cursor.
  pageCursors: [],
  cursor: null,
  nextCursor: null,
  shownSaga: null,
  markers: 0,
  // What the operator typed in a saga's action fields, kept across its re-renders.
  drafts: { abort: '', resolve: '' },
  redriveMatched: null,
};

// ------------------------------------------------------------------ DOM helpers

function $(id) {
  return document.getElementById(id);
}

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  applyAttrs(node, attrs);
  append(node, children);
  return node;
}

function svg(tag, attrs, ...children) {
  const node = document.createElementNS(SVG_NS, tag);
  applyAttrs(node, attrs);
  append(node, children);
  return node;
}

function applyAttrs(node, attrs) {
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key === 'class') node.setAttribute('class', value);
    else if (key.startsWith('on')) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, String(value));
  }
}

function append(node, children) {
  for (const child of children.flat()) {
    if (child === undefined || child === null || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
}

function clear(node) {
  while (node.firstChild) node.removeChild(node.firstChild);
  return node;
}

function pad(n, width = 2) {
  return String(n).padStart(width, '0');
}

function clock(ms) {
  const d = new Date(ms);
  return `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}.${pad(d.getMilliseconds(), 3)}`;
}

function dateTime(ms) {
  const d = new Date(ms);
  const today = new Date();
  const sameDay = d.toDateString() === today.toDateString();
  const day = `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} `;
  return (sameDay ? '' : day) + clock(ms);
}

function span(ms) {
  if (ms < 1000) return `${ms} ms`;
  if (ms < 60000) return `${(ms / 1000).toFixed(ms < 10000 ? 2 : 1)} s`;
  return `${Math.floor(ms / 60000)} min ${Math.round((ms % 60000) / 1000)} s`;
}

function badge(status) {
  return el('span', { class: `badge status-${status}` }, status);
}

// ------------------------------------------------------------------ API access

class Unauthorized extends Error {}

async function api(path, options = {}) {
  const headers = new Headers(options.headers || {});
  headers.set('Accept', 'application/json');
  const token = sessionStorage.getItem(TOKEN_KEY);
  if (token) headers.set('Authorization', `Bearer ${token}`);
  const operator = sessionStorage.getItem(OPERATOR_KEY);
  if (operator && options.method && options.method !== 'GET') headers.set(OPERATOR_HEADER, operator);
  const response = await fetch(path, { ...options, headers, cache: 'no-store' });
  if (response.status === 401) {
    if (token) sessionStorage.removeItem(TOKEN_KEY);
    askForToken(token ? 'That token was refused. Try again.' : null);
    throw new Unauthorized('unauthorized');
  }
  return response;
}

async function apiJson(path, options) {
  const response = await api(path, options);
  if (!response.ok) {
    let message = `${response.status} ${response.statusText}`;
    try {
      const body = await response.json();
      if (body && body.error) message = body.error;
    } catch (_) {
      // not JSON: keep the status line
    }
    const error = new Error(message);
    error.status = response.status;
    throw error;
  }
  return { body: await response.json(), headers: response.headers };
}

function askForToken(message) {
  stopRefreshing();
  $('main').hidden = true;
  $('forget-token').hidden = true;
  $('token-form').hidden = false;
  if (message) $('token-message').textContent = message;
  setLive('needs a token', 'warn');
  $('token-input').focus();
}

function setLive(text, kind) {
  const live = $('live');
  live.textContent = text;
  live.className = `live ${kind || ''}`;
}

// ------------------------------------------------------------------ flows as diagrams

const BOX_H = 46;
const GAP = 46;
const TOP_Y = 18;
const BOTTOM_Y = 124;
const TERM_W = 112;

function textWidth(text, px) {
  return Math.ceil(text.length * px * 0.62);
}

function arrowMarker(defs, id, cls) {
  defs.append(
    svg('marker', { id, viewBox: '0 0 10 10', refX: 9, refY: 5, markerWidth: 7, markerHeight: 7, orient: 'auto-start-reverse' },
      svg('path', { d: 'M0,0 L10,5 L0,10 z', class: `arrowhead ${cls}` })),
  );
}

function line(x1, y1, x2, y2, cls, marker) {
  return svg('line', { x1, y1, x2, y2, class: `edge ${cls}`, 'marker-end': `url(#${marker})` });
}

function box(x, y, w, caption, name, cls, title, data = {}) {
  return svg('g', { class: `box ${cls}`, ...data },
    svg('title', {}, title),
    svg('rect', { x, y, width: w, height: BOX_H, rx: 7 }),
    svg('text', { x: x + w / 2, y: y + 17, class: 'caption' }, caption),
    svg('text', { x: x + w / 2, y: y + 35, class: 'name' }, name));
}

function terminal(x, y, label, cls) {
  return svg('g', { class: `terminal ${cls}` },
    svg('rect', { x, y: y + 6, width: TERM_W, height: BOX_H - 12, rx: (BOX_H - 12) / 2 }),
    svg('text', { x: x + TERM_W / 2, y: y + BOX_H / 2 + 5, class: 'name' }, label));
}

// The flow's stages, each a list of step indexes: one step each in a flow of
// one step after another, several where branches run at once. `shape` is the
// version's stage sizes, absent for a linear flow.
function stagesOf(nodes, shape) {
  const sizes = shape && shape.length ? shape : nodes.map(() => 1);
  const stages = [];
  let first = 0;
  for (const size of sizes) {
    stages.push(Array.from({ length: size }, (_, k) => first + k));
    first += size;
  }
  return stages;
}

// Where each step sits: its stage, its branch (0 in a one-step stage) and the
// stage's size; and the step's label, "2" or, for a branch, "1b".
function placesOf(stages) {
  const places = [];
  stages.forEach((steps, stage) => steps.forEach((step, branch) => {
    const label = steps.length > 1 ? `${stage + 1}${String.fromCharCode(97 + branch)}` : `${stage + 1}`;
    places[step] = { stage, branch, size: steps.length, label };
  }));
  return places;
}

// The stages of the version a saga runs on, when the API says which; else its flow's.
function sagaStages(saga, flow) {
  const nodes = saga.step_details.map((s) => s.node);
  const shape = saga.version && saga.version.shape ? saga.version.shape
    : flow && flow.nodes.length === nodes.length && flow.version ? flow.version.shape : null;
  return stagesOf(nodes, shape);
}

const ROW = BOX_H + 12;

// Draws a flow: Start → stages in order → Completed on top, the branches of a
// parallel stage stacked in its column; under them their compensations. A
// failed step leads to the compensations of the stage before it (a failed
// branch's siblings are compensated too); compensations run right to left,
// a stage's at once, and the last ones end in Compensated.
// `marks` (optional) colours one saga's path: {action: [...], compensation: [...], end}.
function drawFlow(flow, marks) {
  const stages = stagesOf(flow.nodes, flow.version && flow.version.shape);
  const rows = Math.max(1, ...stages.map((s) => s.length));
  const compTop = BOTTOM_Y + (rows - 1) * ROW;
  const widths = stages.map((steps) => Math.max(128, ...steps.map((i) => textWidth(flow.nodes[i], 14) + 28)));
  const xs = [];
  let x = 10 + TERM_W + GAP;
  for (const w of widths) {
    xs.push(x);
    x += w + GAP;
  }
  const width = x + TERM_W + 10;
  const height = compTop + (rows - 1) * ROW + BOX_H + 14;
  const id = `m${++app.markers}`;
  const said = stages.map((steps) => steps.map((i) => flow.nodes[i]).join(' and ')
    + (steps.length > 1 ? ' at once' : '')).join(' then ');
  const root = svg('svg', {
    class: 'flow-diagram',
    viewBox: `0 0 ${width} ${height}`,
    width,
    height,
    role: 'img',
    'aria-label': `${flow.facade}: ${said}`,
    'data-facade': flow.facade,
    'data-stages': stages.map((s) => s.length).join(','),
  });
  const defs = svg('defs');
  for (const cls of ['forward', 'failure', 'rollback']) arrowMarker(defs, `${id}-${cls}`, cls);
  root.append(defs);
  const end = marks ? marks.end : null;
  const topOf = (branch) => TOP_Y + branch * ROW;
  const compOf = (branch) => compTop + branch * ROW;

  // The forward path: every step of a stage follows every step of the one before.
  root.append(terminal(10, TOP_Y, 'start', marks ? 'reached' : ''));
  let from = [{ x: 10 + TERM_W, y: TOP_Y + BOX_H / 2 }];
  stages.forEach((steps, k) => {
    for (const p of from) {
      steps.forEach((_, b) => root.append(line(p.x, p.y, xs[k] - 2, topOf(b) + BOX_H / 2, 'forward', `${id}-forward`)));
    }
    from = steps.map((_, b) => ({ x: xs[k] + widths[k], y: topOf(b) + BOX_H / 2 }));
  });
  const doneX = xs.length ? x : 10 + TERM_W + GAP;
  for (const p of from) root.append(line(p.x, p.y, doneX - 2, TOP_Y + BOX_H / 2, 'forward', `${id}-forward`));
  root.append(terminal(doneX, TOP_Y, 'completed', end === 'completed' ? 'reached completed' : ''));
  root.append(terminal(10, compTop, 'compensated', end === 'compensated' ? 'reached compensated' : end === 'stuck' ? 'reached stuck' : ''));

  // Where the rollback goes from stage k: the nearest stage before it with compensations, else the end.
  const compensable = (i) => Boolean(flow.compensations[i]);
  const below = (k) => {
    for (let j = k - 1; j >= 0; j -= 1) if (stages[j].some(compensable)) return j;
    return -1;
  };
  const targets = (j) => (j < 0 ? [{ x: 10 + TERM_W, y: compTop + BOX_H / 2, top: { x: 10 + TERM_W / 2, y: compTop + 6 } }]
    : stages[j].map((i, b) => ({ i, b })).filter(({ i }) => compensable(i)).map(({ b }) => ({
      x: xs[j] + widths[j], y: compOf(b) + BOX_H / 2, top: { x: xs[j] + widths[j] / 2, y: compOf(b) } })));
  stages.forEach((steps, k) => {
    const first = targets(below(k))[0].top;
    steps.forEach((_, b) => {
      const sx = xs[k] + widths[k] / 2 - (k === 0 ? 0 : 14) + b * 6;
      root.append(line(sx, topOf(b) + BOX_H, first.x + (below(k) < 0 ? 18 : 14), first.y - 2, 'failure', `${id}-failure`));
    });
    steps.forEach((i, b) => {
      if (!compensable(i)) return;
      for (const t of targets(below(k))) {
        root.append(line(xs[k], compOf(b) + BOX_H / 2, t.x + 2, t.y, 'rollback', `${id}-rollback`));
      }
    });
  });
  // Boxes last, over the edges.
  const places = placesOf(stages);
  stages.forEach((steps, k) => steps.forEach((i, b) => {
    const place = places[i];
    const data = { 'data-step': i, 'data-stage': k, 'data-branch': b };
    const what = place.size > 1 ? `branch ${String.fromCharCode(97 + b)} of step ${k + 1}` : `step ${k + 1}`;
    const state = marks ? marks.action[i] : '';
    root.append(box(xs[k], topOf(b), widths[k], `step ${place.label}`, flow.nodes[i], `node ${state || ''}`,
      `${flow.nodes[i]}: action of ${what}${state ? ` (${state})` : ''}`, data));
    if (compensable(i)) {
      const cstate = marks ? marks.compensation[i] : '';
      root.append(box(xs[k], compOf(b), widths[k], 'compensate', flow.nodes[i], `comp ${cstate || ''}`,
        `compensation of ${flow.nodes[i]}${cstate ? ` (${cstate})` : ''}`, data));
    }
  }));
  if (stages.length) {
    // Labelled once, beside where the last stage's failure edge leaves it (the edges run down-left).
    const last = stages.length - 1;
    const lx = xs[last] + widths[last] / 2 - (last === 0 ? 0 : 14) + 8;
    root.append(svg('text', { x: lx, y: topOf(stages[last].length - 1) + BOX_H + 16, class: 'edge-label' }, 'final error'));
  }
  return root;
}

// A flow version as people name it: its label, else its fingerprint's start.
function versionName(version) {
  if (!version) return '';
  return version.label || version.fingerprint.slice(0, 12);
}

// How many unfinished sagas run on a version of a facade ('' when not known).
function unfinishedOn(facade, version) {
  const use = app.versions.find((u) => u.facade === facade && u.version && u.version.fingerprint === version.fingerprint);
  return use ? ` · ${use.unfinished} unfinished` : '';
}

// The versions a flow runs: the current one, those kept for sagas begun on them, each
// with its unfinished sagas, and the versions some of its sagas wait for.
function versionsLine(flow) {
  if (!flow.version) return null;
  const kept = (flow.kept || []).map((v) => el('span', {
    class: 'version kept', title: `fingerprint ${v.fingerprint}: kept for the sagas begun on it`, 'data-fingerprint': v.fingerprint,
  }, `${versionName(v)}${unfinishedOn(flow.facade, v)}`));
  const missing = app.versions.filter((u) => u.facade === flow.facade && u.role === 'missing').map((u) => el('span', {
    class: 'version missing', title: 'not registered here: these sagas wait for a start that registers it',
    'data-fingerprint': u.version ? u.version.fingerprint : '',
  }, `${u.version ? versionName(u.version) : 'unversioned'} · ${u.unfinished} waiting`));
  return el('div', { class: 'versions' },
    'version ',
    el('span', {
      class: 'version current', title: `fingerprint ${flow.version.fingerprint}: new sagas start on it`,
      'data-fingerprint': flow.version.fingerprint,
    }, `${versionName(flow.version)}${unfinishedOn(flow.facade, flow.version)}`),
    kept.length ? ' · kept: ' : null,
    ...kept,
    missing.length ? ' · waiting for: ' : null,
    ...missing);
}

function renderFlows() {
  const holder = clear($('flows'));
  for (const flow of app.flows) {
    const topics = flow.topics && flow.topics.length ? `topics: ${flow.topics.join(', ')}, ` : '';
    const toggle = el('button', {
      type: 'button',
      class: flow.paused ? 'pause-button' : 'pause-button quiet',
      'data-facade': flow.facade,
      title: flow.paused ? 'take new calls again' : 'refuse new calls (UNAVAILABLE) on every replica; running sagas finish',
      onclick: () => setPaused(flow.facade, !flow.paused),
    }, flow.paused ? 'resume' : 'pause');
    holder.append(
      el('figure', { class: flow.paused ? 'flow paused' : 'flow', 'data-facade': flow.facade },
        el('figcaption', {},
          el('strong', {}, flow.facade), ' ', el('span', { class: `mode mode-${flow.mode}` }, flow.mode),
          flow.paused ? el('span', { class: 'paused-label' }, 'paused — new calls refused') : null,
          toggle,
          el('span', { class: 'hint' }, ` ${topics}rollback: ${flow.rollback_topic}`)),
        versionsLine(flow),
        drawFlow(flow)),
    );
  }
  for (const id of ['facade-filter', 'redrive-facade']) {
    const select = $(id);
    const chosen = select.value;
    clear(select).append(el('option', { value: '' }, 'any'));
    for (const flow of app.flows) select.append(el('option', { value: flow.facade }, flow.facade));
    select.value = chosen;
  }
}

async function loadFlows() {
  const { body } = await apiJson('api/flows');
  app.flows = body;
  app.flowsByFacade = new Map(body.map((f) => [f.facade, f]));
  try {
    app.versions = (await apiJson('api/versions')).body;
  } catch (error) {
    if (error instanceof Unauthorized) throw error;
    console.warn(`versions: ${error.message}`);
    setLive(`versions: ${error.message}`, 'error');
  }
}

async function setPaused(facade, paused) {
  const action = paused ? 'pause' : 'resume';
  try {
    await apiJson(`api/flows/${encodeURIComponent(facade)}/${action}`, { method: 'POST' });
    await loadFlows();
    renderFlows();
  } catch (error) {
    if (error instanceof Unauthorized) return;
    report(error);
  }
}

// ------------------------------------------------------------------ redrive

function redriveBody(dryRun) {
  const body = { dry_run: dryRun };
  const facade = $('redrive-facade').value;
  const text = $('redrive-error').value.trim();
  if (facade) body.facade = facade;
  if (text) body.error_contains = text;
  return body;
}

async function redrive(dryRun) {
  const result = $('redrive-result');
  const run = $('redrive-run');
  run.disabled = true;
  $('redrive-count').disabled = true;
  result.textContent = dryRun ? 'counting…' : 'redriving…';
  try {
    const { body } = await apiJson('api/redrive', {
      method: 'POST',
      headers: { 'Content-Type': 'application/json' },
      body: JSON.stringify(redriveBody(dryRun)),
    });
    result.dataset.matched = body.matched;
    if (dryRun) {
      app.redriveMatched = body.matched;
      result.textContent = `${body.matched} stuck saga${body.matched === 1 ? '' : 's'} match`;
      run.textContent = `redrive ${body.matched}`;
      run.disabled = body.matched === 0;
    } else {
      app.redriveMatched = null;
      result.textContent = `${body.matched} stuck saga${body.matched === 1 ? '' : 's'} retried`;
      run.textContent = 'redrive';
    }
  } catch (error) {
    if (error instanceof Unauthorized) return;
    result.textContent = `Redrive refused: ${error.message}`;
  } finally {
    $('redrive-count').disabled = false;
  }
}

function redriveFilterChanged() {
  // A count holds for the filter it was made with only.
  app.redriveMatched = null;
  $('redrive-run').disabled = true;
  $('redrive-run').textContent = 'redrive';
}

// ------------------------------------------------------------------ counts

function renderStats(stats) {
  const counts = clear($('counts'));
  for (const status of STATUSES) {
    counts.append(
      el('div', { class: `count status-${status}` },
        el('span', { class: 'count-value', id: `count-${status}` }, stats.total[status]),
        el('span', { class: 'count-label' }, status)),
    );
  }
  const body = clear($('facade-counts').tBodies[0]);
  for (const [facade, c] of Object.entries(stats.facades)) {
    body.append(el('tr', { 'data-facade': facade },
      el('th', {}, facade), ...STATUSES.map((s) => el('td', { class: c[s] ? `status-${s}` : 'zero' }, c[s]))));
  }
  const scope = stats.truncated
    ? `the newest ${stats.counted} sagas of the log (since ${dateTime(stats.oldest_ms)})`
    : `all ${stats.counted} sagas the log keeps`;
  $('counts-note').textContent = `Counted over ${scope}. Dead-lettered messages: ${stats.engine.dead_lettered}; `
    + `callers waiting: ${stats.engine.waiting_callers}.`;
}

// ------------------------------------------------------------------ recent sagas

function listQuery() {
  const params = new URLSearchParams({ limit: String(PAGE_SIZE) });
  const status = $('status-filter').value;
  const facade = $('facade-filter').value;
  if (status) params.set('status', status);
  if (facade) params.set('facade', facade);
  if (app.cursor) params.set('cursor', app.cursor);
  return `api/sagas?${params}`;
}

function failedNode(saga) {
  const failure = saga.state && saga.state.failure;
  if (!failure) return '';
  // An operator's abort names no node.
  return failure.node || (failure.error.startsWith('aborted by ') ? 'aborted by an operator' : '');
}

function renderRecent(sagas) {
  const body = clear($('recent').tBodies[0]);
  if (!sagas.length) {
    body.append(el('tr', {}, el('td', { colspan: 6, class: 'hint' }, 'no saga matches')));
  }
  for (const saga of sagas) {
    const open = (event) => {
      event.preventDefault();
      showSaga(saga.request_id);
    };
    body.append(el('tr', { 'data-request-id': saga.request_id, class: `row-${saga.state.status}` },
      el('td', {}, el('a', { href: `#saga=${encodeURIComponent(saga.request_id)}`, onclick: open }, saga.request_id)),
      el('td', {}, saga.facade),
      el('td', {}, badge(saga.state.status)),
      el('td', {}, dateTime(saga.created_ms)),
      el('td', {}, span(saga.updated_ms - saga.created_ms)),
      el('td', {}, failedNode(saga))));
  }
  $('older').disabled = !app.nextCursor;
  $('newer').disabled = app.pageCursors.length === 0;
  $('page-label').textContent = `page ${app.pageCursors.length + 1}`;
}

async function refreshRecent() {
  const { body, headers } = await apiJson(listQuery());
  app.nextCursor = headers.get('x-next-cursor');
  renderRecent(body);
}

function resetPaging() {
  app.pageCursors = [];
  app.cursor = null;
  refreshRecent().catch(report);
}

// ------------------------------------------------------------------ one saga

// A step's action as it ended: one still "running" in a saga that went on to
// roll back was a branch cancelled beside a failed sibling, its effect in doubt.
function actionStatus(saga, step) {
  const status = step.action.status;
  return status === 'running' && saga.status !== 'running' ? 'cancelled' : status;
}

function sagaMarks(saga) {
  const action = saga.step_details.map((s) => actionStatus(saga, s));
  const compensation = saga.step_details.map((s) => s.compensation.status);
  const end = ['completed', 'compensated', 'stuck'].includes(saga.status) ? saga.status : null;
  return { action, compensation, end };
}

function nodeOf(saga, step) {
  if (step === null || step === undefined) return '';
  const view = saga.step_details[step];
  return view && view.node ? view.node : `step ${step + 1}`;
}

function renderTimeline(saga, places) {
  const list = el('ol', { id: 'saga-timeline', class: 'timeline' });
  for (const entry of saga.history) {
    const rollback = entry.event === 'step_failed';
    const stuck = entry.event === 'compensation_gave_up';
    const joined = entry.event === 'branches_joined';
    const node = joined ? '' : nodeOf(saga, entry.step);
    const place = entry.step === null || entry.step === undefined ? null : places[entry.step];
    const branch = place && place.size > 1 && !joined ? place.label : null;
    list.append(el('li', {
      class: `entry event-${entry.event}${rollback ? ' rollback' : ''}${stuck ? ' stuck' : ''}${branch ? ' branch' : ''}`,
      'data-event': entry.event,
      'data-node': node,
      'data-branch': branch,
    },
    el('div', { class: 'when' },
      el('time', { datetime: new Date(entry.at_ms).toISOString() }, clock(entry.at_ms)),
      el('span', { class: 'offset' }, `+${span(entry.at_ms - saga.created_ms)}`)),
    el('div', { class: 'what' },
      el('span', { class: 'event' }, EVENT_LABELS[entry.event] || entry.event),
      node ? el('span', { class: 'node' }, node) : null,
      branch ? el('span', { class: 'branch-label', title: `a branch of step ${place.stage + 1}, run beside ${place.size - 1} other${place.size === 2 ? '' : 's'}` }, `branch ${branch}`) : null,
      joined && place ? el('span', { class: 'node' }, `step ${place.stage + 1}: ${place.size} branches merged`) : null,
      entry.attempts ? el('span', { class: 'attempts' }, `${entry.attempts} attempt${entry.attempts === 1 ? '' : 's'}`) : null,
      entry.error ? el('code', { class: 'error' }, entry.error) : null,
      entry.by && !entry.error ? el('span', { class: 'by' }, `by ${entry.by}${entry.reason ? `: ${entry.reason}` : ''}`) : null)));
  }
  return list;
}

function renderSteps(saga, places) {
  const rows = saga.step_details.map((step) => {
    const a = step.action;
    const c = step.compensation;
    const took = a.started_ms && a.ended_ms ? span(a.ended_ms - a.started_ms) : '';
    return el('tr', {},
      el('td', {}, `${places[step.index] ? places[step.index].label : step.index + 1}. ${step.node || ''}`),
      el('td', {}, el('span', { class: `phase phase-${actionStatus(saga, step)}` }, actionStatus(saga, step).replace('_', ' '))),
      el('td', {}, a.attempts || ''),
      el('td', {}, took),
      el('td', {}, el('span', { class: `phase phase-${c.status}` }, c.status.replace('_', ' ')),
        c.attempts ? ` (${c.attempts} attempt${c.attempts === 1 ? '' : 's'})` : ''));
  });
  return el('table', { class: 'grid steps' },
    el('thead', {}, el('tr', {}, el('th', {}, 'step'), el('th', {}, 'action'), el('th', {}, 'attempts'),
      el('th', {}, 'took'), el('th', {}, 'compensation'))),
    el('tbody', {}, rows));
}

function renderSaga(saga) {
  const holder = clear($('saga'));
  const flow = app.flowsByFacade.get(saga.facade);
  holder.append(el('div', { class: 'saga-head', 'data-request-id': saga.request_id },
    el('h3', {}, saga.request_id),
    badge(saga.status),
    el('span', { class: 'hint' },
      ` ${saga.facade} · ${saga.mode} · started ${dateTime(saga.created_ms)} · ${span(saga.duration_ms)}`),
    saga.version ? el('span', {
      class: 'version saga-version', title: `flow version fingerprint ${saga.version.fingerprint}`,
      'data-fingerprint': saga.version.fingerprint,
    }, `version ${versionName(saga.version)}`) : null));
  if (saga.rollback_reason) {
    holder.append(el('div', { id: 'rollback-reason', class: 'reason rollback' },
      el('strong', {}, 'Rolled back because '), saga.rollback_reason));
  }
  if (saga.stuck_reason) {
    const retry = el('button', { id: 'retry-button', type: 'button', onclick: () => retrySaga(saga.request_id) },
      'retry compensation');
    holder.append(el('div', { id: 'stuck-reason', class: 'reason stuck' },
      el('strong', {}, 'Stuck: '), saga.stuck_reason, ' ', retry));
  }
  const actions = sagaActions(saga);
  if (actions) holder.append(actions);
  const otherVersion = saga.version && flow && flow.version && saga.version.fingerprint !== flow.version.fingerprint;
  if (otherVersion) {
    // The diagram is the current version's; this saga runs on its own, whose steps are below.
    holder.append(el('p', { class: 'hint other-version' },
      `Runs on version ${versionName(saga.version)}, not on the current ${versionName(flow.version)}: its steps are listed below.`));
  } else if (flow) {
    holder.append(el('div', { class: 'saga-flow' }, drawFlow(flow, sagaMarks(saga))));
  }
  const places = placesOf(sagaStages(saga, flow));
  holder.append(renderSteps(saga, places));
  holder.append(el('h4', {}, 'Timeline'));
  holder.append(renderTimeline(saga, places));
}

async function showSaga(requestId) {
  const id = requestId.trim();
  if (!id) return;
  $('search-input').value = id;
  if (location.hash !== `#saga=${encodeURIComponent(id)}`) history.replaceState(null, '', `#saga=${encodeURIComponent(id)}`);
  try {
    const { body } = await apiJson(`api/sagas/${encodeURIComponent(id)}`);
    app.shownSaga = body;
    renderSaga(body);
  } catch (error) {
    if (error instanceof Unauthorized) return;
    app.shownSaga = null;
    clear($('saga')).append(el('p', { id: 'saga-missing', class: 'reason missing' },
      error.status === 404 ? `No saga with request id “${id}”.` : `Could not load the saga: ${error.message}`));
  }
}

// The operator's actions that fit the saga's state: abort while running, resolve while stuck.
function sagaActions(saga) {
  const field = (id, draft, placeholder) => {
    const input = el('input', { id, type: 'text', placeholder, autocomplete: 'off', spellcheck: 'false', maxlength: 512,
      'aria-label': placeholder, oninput: (event) => { app.drafts[draft] = event.target.value; } });
    input.value = app.drafts[draft];
    return input;
  };
  if (saga.status === 'running') {
    return el('div', { id: 'saga-actions', class: 'actions' },
      field('abort-reason', 'abort', 'why abort? (required, recorded)'),
      el('button', { id: 'abort-button', type: 'button', class: 'danger', onclick: () => abortSaga(saga.request_id) },
        'abort saga'));
  }
  const pending = saga.state && saga.state.pending;
  if (saga.status === 'stuck' && pending && pending.length) {
    const step = pending[0];
    return el('div', { id: 'saga-actions', class: 'actions' },
      field('resolve-reason', 'resolve', 'how was it settled? (required, recorded)'),
      el('button', { id: 'resolve-button', type: 'button', 'data-step': step,
        onclick: () => resolveSaga(saga.request_id, step) },
      `mark step ${step + 1} (${nodeOf(saga, step)}) compensated`));
  }
  return null;
}

// Posts an operator's action with its reason, then shows the saga again (or why it was refused).
async function act(requestId, action, body, draft) {
  const reason = app.drafts[draft].trim();
  if (!reason) {
    $('saga').prepend(el('p', { id: 'action-refused', class: 'reason rollback action-note' }, 'Give a reason first: it goes into the saga\'s history.'));
    return;
  }
  const button = $(`${action}-button`);
  if (button) button.disabled = true;
  try {
    await apiJson(`api/sagas/${encodeURIComponent(requestId)}/${action}`, {
      method: 'POST',
      headers: { 'Content-Type': 'application/json' },
      body: JSON.stringify({ ...body, reason }),
    });
    app.drafts[draft] = '';
  } catch (error) {
    if (error instanceof Unauthorized) return;
    await showSaga(requestId);
    $('saga').prepend(el('p', { id: 'action-refused', class: 'reason rollback action-note' }, `${action} refused: ${error.message}`));
    return;
  }
  await showSaga(requestId);
}

function abortSaga(requestId) {
  return act(requestId, 'abort', {}, 'abort');
}

function resolveSaga(requestId, step) {
  return act(requestId, 'resolve', { step }, 'resolve');
}

async function retrySaga(requestId) {
  const button = $('retry-button');
  if (button) button.disabled = true;
  try {
    await apiJson(`api/sagas/${encodeURIComponent(requestId)}/retry`, { method: 'POST' });
  } catch (error) {
    if (error instanceof Unauthorized) return;
    await showSaga(requestId);
    $('saga').prepend(el('p', { id: 'retry-refused', class: 'reason rollback' }, `Retry refused: ${error.message}`));
    return;
  }
  await showSaga(requestId);
}

// ------------------------------------------------------------------ refresh loop

function report(error) {
  if (error instanceof Unauthorized) return;
  setLive(`offline: ${error.message}`, 'error');
}

async function refresh() {
  const { body } = await apiJson('api/stats');
  renderStats(body);
  // The first page follows new sagas; an older page stays put while read.
  if (!app.cursor) await refreshRecent();
  const shown = app.shownSaga;
  // Not while the operator types into the saga's actions: a re-render would take the focus.
  const typing = document.activeElement && document.activeElement.closest && document.activeElement.closest('#saga-actions');
  if (shown && !typing && !['completed', 'compensated', 'stuck'].includes(shown.status)) await showSaga(shown.request_id);
  setLive(`live · ${clock(Date.now())}`, 'ok');
}

function stopRefreshing() {
  if (app.timer) clearInterval(app.timer);
  app.timer = null;
}

async function start() {
  try {
    await loadFlows();
  } catch (error) {
    report(error);
    return;
  }
  $('token-form').hidden = true;
  $('main').hidden = false;
  $('forget-token').hidden = !sessionStorage.getItem(TOKEN_KEY);
  renderFlows();
  await refresh().catch(report);
  stopRefreshing();
  app.timer = setInterval(() => refresh().catch(report), REFRESH_MS);
  const match = /^#saga=(.+)$/.exec(location.hash);
  if (match) await showSaga(decodeURIComponent(match[1]));
}

function wire() {
  $('token-form').addEventListener('submit', (event) => {
    event.preventDefault();
    const token = $('token-input').value.trim();
    if (!token) return;
    sessionStorage.setItem(TOKEN_KEY, token);
    $('token-input').value = '';
    start();
  });
  $('forget-token').addEventListener('click', () => {
    sessionStorage.removeItem(TOKEN_KEY);
    askForToken('Token forgotten.');
  });
  $('search-form').addEventListener('submit', (event) => {
    event.preventDefault();
    showSaga($('search-input').value);
  });
  $('operator-name').value = sessionStorage.getItem(OPERATOR_KEY) || '';
  $('operator-name').addEventListener('input', (event) => {
    const name = event.target.value.trim();
    if (name) sessionStorage.setItem(OPERATOR_KEY, name);
    else sessionStorage.removeItem(OPERATOR_KEY);
  });
  $('redrive-form').addEventListener('submit', (event) => {
    event.preventDefault();
    redrive(true);
  });
  $('redrive-run').addEventListener('click', () => redrive(false));
  $('redrive-facade').addEventListener('change', redriveFilterChanged);
  $('redrive-error').addEventListener('input', redriveFilterChanged);
  $('status-filter').addEventListener('change', resetPaging);
  $('facade-filter').addEventListener('change', resetPaging);
  $('older').addEventListener('click', () => {
    if (!app.nextCursor) return;
    app.pageCursors.push(app.cursor);
    app.cursor = app.nextCursor;
    refreshRecent().catch(report);
  });
  $('newer').addEventListener('click', () => {
    if (!app.pageCursors.length) return;
    app.cursor = app.pageCursors.pop();
    refreshRecent().catch(report);
  });
  start();
}

document.addEventListener('DOMContentLoaded', wire);
