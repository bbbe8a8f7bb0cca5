'use strict';
// Causeway web UI: renders the page named by <body data-page> from /ui/api/..., and
// refreshes it when /ui/api/version changes. Data goes into the page as text only.
(function () {
  const PAGE = document.body.dataset.page;
  const content = document.getElementById('content');
  const live = document.getElementById('live');
  const POLL_MS = 3000;
  let etag = null;
  let busy = false;

  // el('td', {class: 'x'}, 'text', otherNode): an element with attributes and children.
  function el(tag, attrs, ...children) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k === 'class') e.className = v;
      else if (k === 'text') e.textContent = v;
      else e.setAttribute(k, v === true ? '' : v);
    }
    for (const c of children.flat()) {
      if (c === null || c === undefined) continue;
      e.append(c instanceof Node ? c : document.createTextNode(String(c)));
    }
    return e;
  }

  function badge(text, kind) {
    return el('span', { class: 'badge ' + (kind || 'info') }, text);
  }

  function table(caption, headers, rows) {
    return el('table', {},
      el('caption', { class: 'muted' }, caption),
      el('thead', {}, el('tr', {}, headers.map((h) => el('th', { scope: 'col' }, h)))),
      el('tbody', {}, rows));
  }

  // svg('line', {x1: 0}): an SVG element (attributes only; text as children).
  function svg(tag, attrs, ...children) {
    const e = document.createElementNS('http://www.w3.org/2000/svg', tag);
    for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, String(v));
    for (const c of children.flat()) e.append(c instanceof Node ? c : document.createTextNode(String(c)));
    return e;
  }

  // The traffic graph: workloads on the left, services on the right, one labelled
  // arrow per edge (the label says the rate, errors, p99 and mTLS or plaintext, so
  // nothing depends on colour; plaintext edges are also dashed).
  function graph(edges, label, security) {
    const left = [...new Set(edges.map((e) => e.source))].sort();
    const right = [...new Set(edges.map((e) => e.destination))].sort();
    const ROW = 56, W = 900, BOX = 200, TOP = 30;
    const H = TOP + Math.max(left.length, right.length) * ROW + 10;
    const y = (list, name) => TOP + list.indexOf(name) * ROW + 18;
    const node = (x, name, kind) => svg('g', { class: 'node ' + kind },
      svg('rect', { x: x, y: y(kind === 'workload' ? left : right, name) - 16, width: BOX, height: 32, rx: 4, fill: '#f5f7fa', stroke: '#1b1f24' }),
      svg('text', { x: x + 8, y: y(kind === 'workload' ? left : right, name) + 5, fill: '#1b1f24', 'font-size': 13 }, name.length > 26 ? name.slice(0, 25) + '…' : name),
      svg('title', {}, kind + ' ' + name));
    const lines = edges.map((e, i) => {
      const y1 = y(left, e.source), y2 = y(right, e.destination);
      const x1 = BOX + 10, x2 = W - BOX - 14;
      const mid = (y1 + y2) / 2 + ((i % 3) - 1) * 12;
      return svg('g', { class: 'edge' },
        svg('line', { x1: x1, y1: y1, x2: x2, y2: y2, stroke: e.mtls ? '#0d5b2a' : '#8c1d18', 'stroke-width': 2, 'stroke-dasharray': e.mtls ? 'none' : '6 4', 'marker-end': 'url(#arrow)' }),
        svg('text', { x: W / 2, y: mid - 4, 'text-anchor': 'middle', fill: '#1b1f24', 'font-size': 12 }, e.protocol + ': ' + label(e) + ' · ' + security(e)),
        svg('title', {}, e.source + ' → ' + e.destination + ': ' + label(e) + ', ' + security(e)));
    });
    return el('figure', { class: 'graph' },
      svg('svg', { viewBox: '0 0 ' + W + ' ' + H, width: '100%', role: 'img', 'aria-labelledby': 'graph-caption', id: 'traffic-graph' },
        svg('defs', {}, svg('marker', { id: 'arrow', viewBox: '0 0 10 10', refX: 10, refY: 5, markerWidth: 8, markerHeight: 8, orient: 'auto-start-reverse' },
          svg('path', { d: 'M 0 0 L 10 5 L 0 10 z', fill: '#1b1f24' }))),
        svg('text', { x: 10, y: 16, fill: '#4a5360', 'font-size': 12 }, 'Workloads'),
        svg('text', { x: W - BOX, y: 16, fill: '#4a5360', 'font-size': 12 }, 'Services'),
        lines,
        left.map((n) => node(0, n, 'workload')),
        right.map((n) => node(W - BOX, n, 'service'))),
      el('figcaption', { id: 'graph-caption', class: 'muted' }, 'Traffic graph: ' + edges.length + ' edges between ' + left.length + ' workloads and ' + right.length + ' services; the table below lists the same edges.'));
  }

  function when(unix, now) {
    if (unix === null || unix === undefined) return '-';
    const d = new Date(unix * 1000);
    const iso = d.toISOString().replace('T', ' ').slice(0, 16) + ' UTC';
    const secs = unix - (now || Math.floor(Date.now() / 1000));
    const abs = Math.abs(secs);
    const span = abs >= 86400 ? Math.floor(abs / 86400) + ' d'
      : abs >= 3600 ? Math.floor(abs / 3600) + ' h'
        : abs >= 60 ? Math.floor(abs / 60) + ' min' : abs + ' s';
    return iso + (secs >= 0 ? ' (in ' + span + ')' : ' (' + span + ' ago)');
  }

  class Unauthorized extends Error {}

  async function api(path, opts) {
    const r = await fetch(path, Object.assign({ credentials: 'same-origin', headers: { Accept: 'application/json' } }, opts || {}));
    const body = await r.json().catch(() => ({}));
    if (r.status === 401) {
      location.assign('/ui/login');
      throw new Unauthorized(body.error || 'not logged in');
    }
    if (!r.ok) throw new Error(body.error || ('HTTP ' + r.status));
    return body;
  }

  function params() {
    return new URLSearchParams(location.search);
  }

  function setParams(p) {
    const s = p.toString();
    history.replaceState(null, '', location.pathname + (s ? '?' + s : ''));
  }

  function showError(e) {
    if (e instanceof Unauthorized) return;
    content.replaceChildren(el('p', { class: 'error', role: 'alert' }, 'Could not load this page: ' + e.message));
  }

  // The search form and pager of a paged list; `load` re-renders.
  function listControls(label, data, load) {
    const p = params();
    const input = el('input', { id: 'q', name: 'q', type: 'search', maxlength: '256', value: p.get('q') || '' });
    const form = el('form', { class: 'search', role: 'search' },
      el('label', { for: 'q' }, label, input),
      el('button', { type: 'submit' }, 'Search'));
    form.addEventListener('submit', (ev) => {
      ev.preventDefault();
      const n = params();
      if (input.value.trim()) n.set('q', input.value.trim()); else n.delete('q');
      n.delete('page');
      setParams(n);
      load(true);
    });
    const go = (page) => {
      const n = params();
      n.set('page', String(page));
      setParams(n);
      load(false);
    };
    const prev = el('button', { type: 'button', disabled: data.page <= 1 }, 'Previous page');
    const next = el('button', { type: 'button', disabled: data.page >= data.pages }, 'Next page');
    prev.addEventListener('click', () => go(data.page - 1));
    next.addEventListener('click', () => go(data.page + 1));
    const summary = el('span', { id: 'pager-summary' },
      'Page ' + data.page + ' of ' + data.pages + ': ' + data.total + ' matching of ' + data.all);
    return [form, el('div', { class: 'pager' }, prev, summary, next)];
  }

  function query(extra) {
    const p = params();
    const q = new URLSearchParams();
    if (p.get('q')) q.set('q', p.get('q'));
    if (p.get('page')) q.set('page', p.get('page'));
    for (const [k, v] of Object.entries(extra || {})) q.set(k, v);
    const s = q.toString();
    return s ? '?' + s : '';
  }

  // Keeps the search box focused across a re-render.
  function render(nodes, keepFocus) {
    const focused = keepFocus && document.activeElement && document.activeElement.id;
    content.replaceChildren(...nodes);
    if (focused) {
      const f = document.getElementById(focused);
      if (f) f.focus();
    }
  }

  const pages = {
    async overview() {
      const d = await api('/ui/api/overview');
      const card = (label, value, id) => el('div', {}, el('dt', {}, label), el('dd', { id: id }, value));
      const nodes = [
        el('dl', { class: 'cards' },
          card('Agents connected', d.agents.connected + ' of ' + d.agents.total, 'agents-connected'),
          card('Config version', String(d.version), 'config-version'),
          card('Agents behind', String(d.agents_behind), 'agents-behind'),
          card('Agents refusing (NACK)', String(d.agents_nacking), 'agents-nacking'),
          card('Certificates expiring within 24 h', String(d.certs_expiring_count), 'certs-expiring'),
          card('Services', String(d.services), 'services-count'),
          card('Registry conflicts', String(d.conflicts), 'conflicts-count'),
          card('Policy resources', String(d.policies), 'policies-count')),
        el('h2', {}, 'Registry sources'),
      ];
      if (d.sources.length === 0) {
        nodes.push(el('p', {}, 'No registry source is configured; agents register their own workloads.'));
      } else {
        nodes.push(table('Each configured source and its state', ['Source', 'Kind', 'State', 'Services', 'Endpoints', 'Last error'],
          d.sources.map((s) => el('tr', {},
            el('td', {}, s.name), el('td', {}, s.kind),
            el('td', {}, badge(s.state, s.state === 'synced' ? 'ok' : s.state === 'stale' ? 'bad' : 'warn')),
            el('td', {}, String(s.services)), el('td', {}, String(s.endpoints)),
            el('td', {}, s.last_error || '-')))));
      }
      nodes.push(el('h2', {}, 'Certificates expiring within 24 h'));
      if (d.certs_expiring.length === 0) {
        nodes.push(el('p', {}, 'None.'));
      } else {
        nodes.push(table('Agents whose certificate expires soonest (they renew on their own while connected)', ['Agent', 'Group', 'Host', 'Expires'],
          d.certs_expiring.map((c) => el('tr', {},
            el('td', { class: 'mono' }, c.agent), el('td', {}, c.group), el('td', {}, c.hostname),
            el('td', {}, when(c.not_after, d.now))))));
      }
      return nodes;
    },

    async services(keepFocus) {
      const d = await api('/ui/api/services' + query());
      const reload = (kf) => refresh(kf);
      const rows = d.items.map((s) => {
        const eps = el('ul', { class: 'endpoints' }, s.endpoints.map((e) => el('li', {},
          el('span', { class: 'mono' }, e.address), ' ',
          Object.entries(e.ports).map(([n, p]) => n + ':' + p).join(' '), ' ',
          badge(e.healthy ? 'healthy' : 'unhealthy', e.healthy ? 'ok' : 'bad'),
          e.stale ? [' ', badge('stale source', 'warn')] : null,
          ' from ', el('span', { class: 'source' }, e.sources.join(' + ')), ' (' + e.kind + ')',
          e.identity ? [' as ', el('span', { class: 'mono identity' }, e.identity)] : [' ', badge('no agent', 'info')])));
        return el('tr', { class: s.conflicts.length ? 'conflict' : null },
          el('th', { scope: 'row', class: 'service-name' }, s.key),
          el('td', { class: 'mono' }, s.vip || '-'),
          el('td', {}, s.ports.join(', ') || '-'),
          el('td', {}, eps),
          el('td', {}, Array.from(s.sources).join(', ')),
          el('td', {}, s.conflicts.length
            ? [badge('conflict', 'warn'), el('ul', {}, s.conflicts.map((c) => el('li', {}, c)))]
            : badge(s.healthy + ' of ' + s.endpoints.length + ' healthy', s.healthy ? 'ok' : 'bad')));
      });
      return [
        ...listControls('Search services (name, namespace, address, source, identity)', d, reload),
        d.items.length === 0
          ? el('p', {}, d.all === 0 ? 'The registry is empty.' : 'No service matches.')
          : table('Services in the merged registry: endpoints with their source (provenance) and identity', ['Service', 'VIP', 'Ports', 'Endpoints', 'Sources', 'Status'], rows),
      ];
    },

    async agents() {
      const d = await api('/ui/api/agents' + query());
      const rows = d.items.map((a) => el('tr', {},
        el('th', { scope: 'row', class: 'mono' }, a.id),
        el('td', { class: 'mono' }, a.identity),
        el('td', {}, a.group),
        el('td', {}, a.hostname, el('br'), el('span', { class: 'mono' }, a.address)),
        el('td', {}, badge(a.state, a.state === 'connected' ? 'ok' : a.state === 'removed' ? 'bad' : 'warn')),
        el('td', {}, a.acked_version === null ? 'never' : 'version ' + a.acked_version + (a.behind ? ' (' + a.behind + ' behind)' : ' (current)')),
        el('td', { class: 'expiry' }, when(a.not_after, d.now), a.expires_in_secs < 86400 ? [' ', badge(a.expires_in_secs < 0 ? 'expired' : 'expires within 24 h', 'warn')] : null),
        el('td', {}, a.last_nack ? [badge('NACK', 'bad'), ' version ' + a.last_nack.version + ': ' + a.last_nack.error] : '-',
          a.registration_error ? [el('br'), badge('not registered', 'bad'), ' ' + a.registration_error] : null)));
      return [
        el('p', { class: 'muted' }, 'Removing an agent is a CLI action: causewayctl agent remove ID.'),
        ...listControls('Search agents (id, identity, group, host, address)', d, (kf) => refresh(kf)),
        d.items.length === 0
          ? el('p', {}, d.all === 0 ? 'No agent has joined yet.' : 'No agent matches.')
          : table('Enrolled agents', ['Agent', 'Identity', 'Group', 'Host and address', 'State', 'Last ACK', 'Certificate expiry', 'NACK reason'], rows),
      ];
    },

    async traffic() {
      const d = await api('/ui/api/traffic');
      if (d.edges.length === 0) {
        return [el('p', { id: 'no-traffic' }, 'No traffic data yet.'), el('p', { class: 'muted' }, d.message)];
      }
      const rate = (x) => x >= 100 ? x.toFixed(0) : x >= 1 ? x.toFixed(1) : x.toFixed(2);
      const bytes = (x) => x >= 1048576 ? (x / 1048576).toFixed(1) + ' MB/s' : x >= 1024 ? (x / 1024).toFixed(1) + ' kB/s' : x.toFixed(0) + ' B/s';
      const pct = (x) => (x * 100).toFixed(x > 0 && x < 0.01 ? 2 : 1) + ' %';
      const p99 = (e) => e.p99_ms === null || e.p99_ms === undefined ? (e.requests ? '> 10 s' : '-') : '≤ ' + e.p99_ms + ' ms';
      const security = (e) => e.mtls ? 'mTLS' : 'plaintext';
      const label = (e) => e.protocol === 'tcp'
        ? 'tcp ' + bytes(e.bytes_rate)
        : rate(e.request_rate) + ' req/s, ' + pct(e.error_rate) + ' err, p99 ' + p99(e);
      return [
        graph(d.edges, label, security),
        table('Traffic between workloads and services (' + d.agents_reporting + ' agents reporting' + (d.dropped ? ', ' + d.dropped + ' quieter edges left out by the agents' : '') + ')',
          ['From (workload)', 'To (service)', 'Protocol', 'Requests/s', 'Errors', 'p99 latency', 'Bytes/s', 'Security', 'Seen by'],
          d.edges.map((e) => el('tr', { class: 'edge' },
            el('th', { scope: 'row' }, e.source), el('td', {}, e.destination), el('td', {}, e.protocol),
            el('td', {}, e.protocol === 'tcp' ? '-' : rate(e.request_rate)),
            el('td', {}, e.protocol === 'tcp' ? '-' : pct(e.error_rate), e.error_rate > 0 ? [' ', badge('errors', 'bad')] : null),
            el('td', {}, e.protocol === 'tcp' ? '-' : p99(e)),
            el('td', {}, bytes(e.bytes_rate)),
            el('td', {}, badge(security(e), e.mtls ? 'ok' : 'warn')),
            el('td', {}, e.reporter)))),
      ];
    },

    async policy() {
      const d = await api('/ui/api/policies' + query());
      const field = (id, label, required) => el('label', { for: id }, label,
        el('input', { id: id, name: id, type: 'text', required: required, maxlength: '512', value: whyState[id] || '' }));
      const form = el('form', { class: 'why', id: 'why-form' },
        field('why-from', 'From: group, agent id or address', true),
        field('why-to', 'To: service[.namespace][:port] or address', true),
        field('why-method', 'HTTP method (optional)', false),
        field('why-path', 'HTTP path (optional)', false),
        el('button', { type: 'submit' }, 'Explain'));
      form.addEventListener('input', (ev) => { whyState[ev.target.id] = ev.target.value; });
      const out = el('div', { id: 'why-result', 'aria-live': 'polite' });
      if (whyState.result) out.replaceChildren(...whyState.result);
      form.addEventListener('submit', async (ev) => {
        ev.preventDefault();
        const v = (id) => document.getElementById(id).value.trim();
        for (const id of ['why-from', 'why-to', 'why-method', 'why-path']) whyState[id] = v(id);
        const body = { from: v('why-from'), to: v('why-to') };
        if (v('why-method')) body.method = v('why-method');
        if (v('why-path')) body.path = v('why-path');
        try {
          const w = await api('/ui/api/why', { method: 'POST', headers: { 'Content-Type': 'application/json', Accept: 'application/json' }, body: JSON.stringify(body) });
          whyState.result = [
            el('p', {}, 'Decision: ', badge(w.decision.toUpperCase(), w.decision === 'allow' ? 'ok' : 'bad'),
              w.policy ? ' by ' + w.policy : ''),
            el('ol', { class: 'steps' }, w.steps.map((s) => el('li', {}, el('strong', {}, s.step + ': '), s.detail))),
          ];
          if (w.recent_denials && w.recent_denials.length) {
            whyState.result.push(el('p', {}, 'Recent refusals of this source by the destination: ' + w.recent_denials.length));
          }
        } catch (e) {
          if (e instanceof Unauthorized) return;
          whyState.result = [el('p', { class: 'error', role: 'alert' }, e.message)];
        }
        out.replaceChildren(...whyState.result);
      });
      const rows = d.items.map((p) => el('tr', {},
        el('th', { scope: 'row' }, p.namespace + '/' + p.name),
        el('td', {}, p.kind), el('td', {}, String(p.version)),
        el('td', {}, el('details', {}, el('summary', {}, 'Resource'), el('pre', {}, JSON.stringify(p.resource, null, 2))))));
      return [
        el('h2', {}, 'Why is a connection allowed or refused?'),
        el('p', { class: 'muted' }, 'The same evaluator as causewayctl why, with the controller\'s current registry, agents and policies.'),
        form, out,
        el('h2', {}, 'Applied resources'),
        ...listControls('Search resources (kind, namespace, name)', d, (kf) => refresh(kf)),
        d.items.length === 0
          ? el('p', {}, d.all === 0 ? 'No policy resource is applied: every connection is allowed (PERMISSIVE mTLS).' : 'No resource matches.')
          : table('AuthorizationPolicy and PeerAuthentication resources', ['Resource', 'Kind', 'Mesh version', 'Spec'], rows),
      ];
    },
  };
  const whyState = {};

  async function refresh(keepFocus) {
    if (busy || !pages[PAGE]) return;
    busy = true;
    try {
      const nodes = await pages[PAGE](keepFocus);
      render(nodes, keepFocus);
      if (!document.body.dataset.rendered) {
        document.body.dataset.rendered = String(Math.round(performance.now()));
      }
      live.textContent = 'Updated ' + new Date().toLocaleTimeString() + (PAGE === 'traffic' ? '; refreshes every few seconds.' : '; refreshes when the mesh changes.');
    } catch (e) {
      showError(e);
    } finally {
      busy = false;
    }
  }

  async function poll() {
    if (document.hidden) return;
    // Traffic changes without a mesh change: that page reloads its data each time.
    if (PAGE === 'traffic') {
      await refresh(true);
      return;
    }
    try {
      const v = await api('/ui/api/version');
      if (etag !== null && v.etag !== etag) {
        etag = v.etag;
        await refresh(true);
      }
      etag = v.etag;
    } catch (e) {
      if (!(e instanceof Unauthorized)) live.textContent = 'The controller did not answer (' + e.message + '); retrying.';
    }
  }

  document.getElementById('logout').addEventListener('click', async () => {
    await fetch('/ui/api/session', { method: 'DELETE', credentials: 'same-origin' });
    location.assign('/ui/login');
  });

  refresh(false).then(poll);
  setInterval(poll, POLL_MS);
})();
