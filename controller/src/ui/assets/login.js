'use strict';
// The login page: redeems the one-time code in the URL's fragment (never sent to the
// server in a request line), or the admin token from the form, for a session cookie.
(function () {
  const status = document.getElementById('status');
  const form = document.getElementById('token-form');

  function show(msg) {
    status.textContent = msg;
    status.hidden = false;
  }

  async function login(body) {
    let r;
    try {
      r = await fetch('/ui/api/session', {
        method: 'POST',
        headers: { 'Content-Type': 'application/json' },
        body: JSON.stringify(body),
        credentials: 'same-origin',
      });
    } catch (e) {
      show('The controller did not answer: ' + e.message);
      return;
    }
    const answer = await r.json().catch(() => ({}));
    if (r.ok) {
      location.replace(answer.next || '/ui/services');
    } else {
      show('Login refused: ' + (answer.error || ('HTTP ' + r.status)));
    }
  }

  form.addEventListener('submit', (ev) => {
    ev.preventDefault();
    const input = document.getElementById('token');
    const token = input.value.trim();
    input.value = '';
    login({ token: token });
  });

  const params = new URLSearchParams(location.hash.slice(1));
  const code = params.get('code');
  if (code) {
    // Out of the address bar and history at once: the code works only once anyway.
    history.replaceState(null, '', location.pathname);
    show('Logging in…');
    login({ code: code });
  }
})();
