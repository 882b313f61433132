// musetalk-sidecar status page: live updates for the server-rendered page.
// Plain JavaScript, no library, no request to any other host (the CSP forbids it).
// Without JavaScript the page is complete as served; this only keeps it current.
(function () {
  'use strict';

  // --- Errors: recorded on the page (#ui-errors) so nobody has to open the console.
  var errors = [];
  function recordError(msg) {
    errors.push(String(msg));
    var el = document.getElementById('ui-errors');
    if (el) {
      el.setAttribute('data-count', String(errors.length));
      el.textContent = 'Page errors: ' + errors.join(' | ');
      el.hidden = false;
    }
  }
  window.addEventListener('error', function (e) {
    recordError((e && e.message) || 'script error');
  });
  window.addEventListener('unhandledrejection', function (e) {
    var r = e && e.reason;
    recordError('unhandled rejection: ' + ((r && r.message) || r));
  });
  document.addEventListener('securitypolicyviolation', function (e) {
    recordError('blocked by the content security policy: ' + e.blockedURI + ' (' + e.violatedDirective + ')');
  });
  var consoleError = console.error;
  console.error = function () {
    recordError(Array.prototype.map.call(arguments, String).join(' '));
    return consoleError.apply(console, arguments);
  };

  // --- Requests. Polling requests carry an unsampled W3C traceparent so that a page
  // left open does not fill the trace backend with spans of its own refreshes.
  function hex(bytes) {
    var a = new Uint8Array(bytes);
    crypto.getRandomValues(a);
    return Array.prototype.map.call(a, function (b) { return (b < 16 ? '0' : '') + b.toString(16); }).join('');
  }
  function request(url, accept) {
    return fetch(url, {
      headers: { 'Accept': accept, 'traceparent': '00-' + hex(16) + '-' + hex(8) + '-00' },
      credentials: 'same-origin',
      cache: 'no-store'
    }).then(function (r) {
      if (!r.ok) { throw new Error(url + ': HTTP ' + r.status); }
      return accept === 'application/json' ? r.json() : r.text();
    });
  }

  var live = document.getElementById('live-status');
  var failures = 0;
  function liveOk() {
    failures = 0;
    if (live) { live.textContent = 'Live: updated ' + new Date().toLocaleTimeString(); }
  }
  function liveFailed(err) {
    failures += 1;
    if (live) { live.textContent = 'Live updates paused (' + err.message + '); retrying.'; }
  }

  // --- Sections (#health, #jobs, #job): re-rendered on the server, swapped in only
  // when their fingerprint changed; keyboard focus stays on the same link.
  function swapSection(current, html) {
    var doc = new DOMParser().parseFromString(html, 'text/html');
    var next = doc.getElementById(current.id);
    if (!next) { throw new Error('partial without #' + current.id); }
    if (next.getAttribute('data-fp') === current.getAttribute('data-fp')) { return current; }
    var active = document.activeElement;
    var hadFocus = active && current.contains(active);
    var focusHref = hadFocus ? active.getAttribute('href') : null;
    var imported = document.importNode(next, true);
    current.parentNode.replaceChild(imported, current);
    if (hadFocus) {
      var target = focusHref ? imported.querySelector('a[href="' + focusHref + '"]') : null;
      (target || imported.querySelector('h2')).focus();
    }
    return imported;
  }

  function pollSection(id) {
    var el = document.getElementById(id);
    if (!el) { return; }
    var every = parseInt(el.getAttribute('data-refresh') || '0', 10);
    if (!every) { return; }
    setTimeout(function tick() {
      var cur = document.getElementById(id);
      request(cur.getAttribute('data-partial'), 'text/html').then(function (html) {
        cur = swapSection(cur, html);
        liveOk();
      }, liveFailed).then(function () {
        var next = parseInt(document.getElementById(id).getAttribute('data-refresh') || '0', 10);
        if (next) { setTimeout(tick, failures ? Math.min(30000, next * (failures + 1)) : next); }
      });
    }, every);
  }

  // --- Sparklines: every 2 s, new polyline points and values from the ring buffer.
  function updateResources(data) {
    var missing = false;
    data.series.forEach(function (s) {
      var svg = document.querySelector('svg[data-series="' + s.id + '"]');
      if (!svg) { missing = true; return; }
      svg.querySelector('polyline').setAttribute('points', s.points);
      var last = document.querySelector('[data-series-last="' + s.id + '"]');
      if (last) { last.textContent = s.last_text; }
      var peak = document.querySelector('[data-series-peak="' + s.id + '"]');
      if (peak) { peak.textContent = s.peak_text; }
    });
    var shown = document.querySelectorAll('svg[data-series]').length;
    return missing || shown !== data.series.length;
  }

  function pollResources() {
    var section = document.getElementById('resources');
    if (!section) { return; }
    var url = section.getAttribute('data-resources');
    setTimeout(function tick() {
      request(url, 'application/json').then(function (data) {
        if (updateResources(data)) {
          // A GPU appeared or went away: the cards themselves change.
          var cur = document.getElementById('resources');
          return request(cur.getAttribute('data-partial'), 'text/html').then(function (html) {
            swapSection(cur, html);
          });
        }
      }).then(liveOk, liveFailed).then(function () {
        setTimeout(tick, failures ? Math.min(30000, 2000 * (failures + 1)) : 2000);
      });
    }, 2000);
  }

  function start() {
    if (live) { live.textContent = 'Live: connecting…'; }
    pollResources();
    pollSection('health');
    pollSection('jobs');
    pollSection('job');
    if (!document.querySelector('[data-refresh]:not([data-refresh="0"])') && !document.getElementById('resources') && live) {
      live.textContent = 'This job has ended; the page no longer changes.';
    }
  }
  if (document.readyState === 'loading') {
    document.addEventListener('DOMContentLoaded', start);
  } else {
    start();
  }
})();
