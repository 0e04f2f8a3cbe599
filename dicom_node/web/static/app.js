// Live updates without a reload: the jobs table fetches its rows again, a job page watches its state.
(function () {
  "use strict";
  function every(ms, fn) {
    async function tick() {
      try { await fn(); } catch (e) { /* the node may be restarting: try again later */ }
      setTimeout(tick, ms);
    }
    setTimeout(tick, ms);
  }

  const rows = document.getElementById("rows");
  if (rows) {
    every(Number(rows.dataset.refresh) || 3000, async function () {
      const r = await fetch(rows.dataset.src, { credentials: "same-origin", cache: "no-store" });
      if (r.status === 401) { window.location.reload(); return; }
      if (!r.ok) return;
      rows.innerHTML = await r.text();
      document.getElementById("updated").textContent = new Date().toLocaleTimeString();
    });
  }

  const head = document.querySelector(".jobhead[data-job]");
  const badge = document.getElementById("state");
  if (head && badge) {
    every(3000, async function () {
      const r = await fetch("/api/jobs", { credentials: "same-origin", cache: "no-store" });
      if (!r.ok) return;
      const job = (await r.json()).find(function (j) { return j.id === head.dataset.job; });
      // reload without "?done=...": the message of an action taken before is stale once the state moved on
      if (job && job.state !== badge.textContent.trim()) window.location.replace(window.location.pathname);
    });
  }
})();
