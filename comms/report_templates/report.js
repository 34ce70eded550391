(function () {
  "use strict";
  var collator = new Intl.Collator(undefined, { numeric: true, sensitivity: "base" });
  function value(row, idx, numeric) {
    var cell = row.cells[idx];
    var raw = cell.getAttribute("data-v");
    if (raw === null) { raw = cell.textContent; }
    if (numeric) { var n = parseFloat(raw); return isNaN(n) ? 0 : n; }
    return raw.trim();
  }
  function sortBy(table, th, idx) {
    var numeric = th.getAttribute("data-type") === "num";
    var asc = th.getAttribute("aria-sort") !== "ascending";
    var body = table.tBodies[0];
    var rows = Array.prototype.slice.call(body.rows);
    // Decorate once, sort, re-append: thousands of rows sort in milliseconds.
    var keyed = rows.map(function (row, i) { return [value(row, idx, numeric), i, row]; });
    keyed.sort(function (a, b) {
      var c = numeric ? a[0] - b[0] : collator.compare(a[0], b[0]);
      if (c === 0) { c = a[1] - b[1]; }
      return asc ? c : -c;
    });
    var frag = document.createDocumentFragment();
    keyed.forEach(function (k) { frag.appendChild(k[2]); });
    body.appendChild(frag);
    Array.prototype.forEach.call(table.tHead.rows[0].cells, function (h) { h.setAttribute("aria-sort", "none"); });
    th.setAttribute("aria-sort", asc ? "ascending" : "descending");
  }
  Array.prototype.forEach.call(document.querySelectorAll("table.sortable"), function (table) {
    Array.prototype.forEach.call(table.tHead.rows[0].cells, function (th, idx) {
      th.setAttribute("aria-sort", "none");
      var button = th.querySelector("button");
      if (button) { button.addEventListener("click", function () { sortBy(table, th, idx); }); }
    });
  });
  var filter = document.getElementById("customer-filter");
  var table = document.getElementById("customer-table");
  var count = document.getElementById("customer-count");
  if (filter && table) {
    filter.addEventListener("input", function () {
      var q = filter.value.trim().toLowerCase();
      var shown = 0;
      Array.prototype.forEach.call(table.tBodies[0].rows, function (row) {
        var hit = !q || row.textContent.toLowerCase().indexOf(q) !== -1;
        row.hidden = !hit;
        if (hit) { shown += 1; }
      });
      count.textContent = shown + " of " + table.tBodies[0].rows.length + " customers shown.";
    });
  }
  // A "swipe sideways" hint above each scrolling box, shown only while the box overflows.
  function hints() {
    Array.prototype.forEach.call(document.querySelectorAll(".scroll-hint"), function (hint) {
      var box = hint.nextElementSibling;
      hint.hidden = !(box && box.scrollWidth > box.clientWidth + 1);
    });
  }
  hints();
  window.addEventListener("resize", hints);
  document.documentElement.setAttribute("data-ready", "1");
})();
