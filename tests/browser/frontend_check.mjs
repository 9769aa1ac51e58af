// Drives the real ComfyUI frontend in headless Chromium (playwright-core) for tests/test_frontend.py.
//
//   node tests/browser/frontend_check.mjs CONFIG.json
//
// CONFIG: {url, chromium, node_prefix (where playwright-core is installed), artifacts (folder for
// screenshots), result (path of the JSON result), nodes: [{type, display_name, category}],
// workflows: [{name, graph}], run: {name, graph, widgets: [[node type, widget name, value], ...],
// output_type, timeout_ms} | null, help: {type, text, image} | null (a node whose help page must show
// `text` and the picture `image`), templates: {module, names} | null (the pack's templates, opened from
// the Templates browser)}.
//
// Every phase records what it saw (and any error) in the result; the pytest test judges it. The script
// exits non-zero only when it cannot produce a result at all.
import { createRequire } from 'node:module';
import fs from 'node:fs';
import path from 'node:path';

const config = JSON.parse(fs.readFileSync(process.argv[2], 'utf8'));
const require = createRequire(path.join(config.node_prefix, 'package.json'));
const { chromium } = require('playwright-core');

const result = { phases: {}, page_errors: [], console_errors: [], timings_ms: {} };
const t0 = Date.now();
const mark = (name) => { result.timings_ms[name] = Date.now() - t0; };
const save = () => fs.writeFileSync(config.result, JSON.stringify(result, null, 1));
const shotPath = (name) => path.join(config.artifacts, `${name}.png`);
fs.mkdirSync(config.artifacts, { recursive: true });

async function phase(name, fn) {
  const out = { ok: false };
  result.phases[name] = out;
  try {
    Object.assign(out, await fn());
    out.ok = true;
  } catch (e) {
    out.error = String(e && e.stack || e).slice(0, 3000);
    const file = shotPath(`error_${name.replace(/[^\w.-]+/g, '_')}`);
    out.screenshot = page ? await page.screenshot({ path: file }).then(() => file).catch(() => null) : null;
  }
  save();
  return out;
}

const browser = await chromium.launch({
  executablePath: config.chromium,
  headless: true,
  args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
         '--disable-background-networking', '--disable-component-update', '--disable-sync',
         '--disable-dev-shm-usage'],
});
let page;
try {
  // a fresh incognito-like context = a fresh, empty profile
  const context = await browser.newContext({ viewport: { width: 1600, height: 1000 } });
  page = await context.newPage();
  page.on('pageerror', (e) => result.page_errors.push(String(e).slice(0, 500)));
  page.on('console', (m) => { if (m.type() === 'error') result.console_errors.push(m.text().slice(0, 500)); });
  const prompts = [];
  page.on('request', (r) => {
    if (r.method() === 'POST' && new URL(r.url()).pathname.endsWith('/prompt')) prompts.push(r.postData());
  });

  const dialogs = () => page.evaluate(() => [...document.querySelectorAll('.p-dialog')]
    .filter((d) => d.offsetParent !== null || d.getClientRects().length)
    .map((d) => ({ id: d.getAttribute('aria-labelledby'), text: d.innerText.slice(0, 500) })));
  // error notices (frontend >= 1.4x: an overlay lists what is wrong with the loaded workflow, e.g. a
  // missing node type, where older frontends opened a dialog)
  const notices = () => page.evaluate(() => [...document.querySelectorAll('[data-testid="error-overlay"]')]
    .filter((d) => d.getClientRects().length)
    .map((d) => ({ id: d.getAttribute('data-testid'), text: d.innerText.slice(0, 500) })));
  const closeDialogs = async () => {
    for (let i = 0; i < 3 && (await dialogs()).length; i++) {
      await page.keyboard.press('Escape');
      await page.waitForTimeout(300);
    }
  };
  const fitView = async () => {
    await page.evaluate(() => {
      const canvas = window.app.canvas;
      if (typeof canvas.fitViewToSelectionAnimated === 'function') canvas.fitViewToSelectionAnimated({ duration: 0 });
      else canvas.ds.fitToBounds(canvas.graph.bounds ?? canvas.graph._nodes.map((n) => n.boundingRect));
      canvas.setDirty(true, true);
    }).catch(() => page.keyboard.press('.'));
    await page.waitForTimeout(400);
  };
  const promptResponses = [];
  page.on('response', async (r) => {
    if (r.request().method() === 'POST' && new URL(r.url()).pathname.endsWith('/prompt')) {
      promptResponses.push({ status: r.status(), body: (await r.text().catch(() => '')).slice(0, 3000) });
    }
  });

  // the frontend: loaded, with its node definitions, its canvas and no dialog in the way

  await phase('startup', async () => {
    await page.goto(config.url, { waitUntil: 'domcontentloaded', timeout: 60000 });
    await page.waitForFunction(() => window.app && window.app.graph && window.app.canvas &&
      window.LiteGraph && Object.keys(window.LiteGraph.registered_node_types).length > 0 &&
      document.querySelector('canvas'), null, { timeout: 90000 });
    await page.waitForTimeout(1000);
    mark('frontend_ready');
    // cosmetic, for the screenshots: draw node text even when a fitted graph is zoomed out
    await page.evaluate(() => window.app.extensionManager.setting.set('LiteGraph.Canvas.MinFontSizeForLOD', 1))
      .catch(() => {});
    return {
      frontend_version: await page.evaluate(() => window.__COMFYUI_FRONTEND_VERSION__ ?? null),
      dialogs: await dialogs(),
    };
  });
  await closeDialogs();

  // --- every node of the pack in the Node Library sidebar, under its category, by display name ---
  // Two designs: the PrimeVue tree (frontend <= 1.3x: nested li[role=treeitem][aria-label=NAME], a
  // .search-box-input) and the redesigned library (Comfy.NodeLibrary.NewDesign, on by default in 1.4x:
  // a flat, virtualised list of [role=treeitem] rows with aria-level, the name in the row's text, and a
  // "Search..." combobox). Both are driven the way a user does: type in the search box, open folders.
  await phase('node_library', async () => {
    await page.click('button.node-library-tab-button', { timeout: 15000 });
    const search = page.locator('.search-box-input, input[role="combobox"][placeholder^="Search"]').first();
    await search.waitFor({ timeout: 15000 });
    const design = (await page.locator('.search-box-input').count()) ? 'tree' : 'list';
    const row = (name, level) => {
      const lvl = level ? `[aria-level="${level}"]` : '';
      return design === 'tree'
        ? `li[role="treeitem"]${lvl}[aria-label=${JSON.stringify(name)}]`
        : `[role="treeitem"]${lvl}:has(> span:text-is(${JSON.stringify(name)}))`;
    };
    const found = {};
    for (const node of config.nodes) {
      await search.fill(node.display_name);
      let ok = true;
      try {
        await page.locator(row(node.display_name)).first().waitFor({ state: 'visible', timeout: 5000 });
      } catch { ok = false; }
      found[node.type] = { search: ok };
    }
    await search.fill('');
    await page.waitForTimeout(500);
    // the category tree: expand each folder of each category path, then look for the leaves
    for (const node of config.nodes) {
      let scope = page;  // the sidebar's tree (other, hidden trees exist on the page)
      let ok = true;
      let level = 1;
      let parentIndex = -1;
      for (const folder of node.category.split('/')) {
        const item = scope.locator(`${row(folder, level++)}:visible`).first();
        try {
          await item.scrollIntoViewIfNeeded({ timeout: 5000 });
          await item.waitFor({ state: 'visible', timeout: 5000 });
        } catch { ok = false; break; }
        if ((await item.getAttribute('aria-expanded')) !== 'true') {
          if (design === 'tree') await item.locator(':scope > .p-tree-node-content').click();
          else await item.click();
        }
        if (design === 'tree') scope = item.locator(':scope > ul');
        else {
          // the list's rows are siblings: stay in this folder's tree, after this folder's row
          scope = item.locator('xpath=ancestor::*[@role="tree"][1]');
          parentIndex = Number(await item.getAttribute('data-index'));
          await item.evaluate((el) => el.scrollIntoView({ block: 'start' }));
        }
      }
      if (ok) {
        try {
          const leaf = design === 'tree'
            ? scope.locator(`:scope > ${row(node.display_name)}`)
            : scope.locator(`${row(node.display_name, level)}:not([aria-expanded])`);
          await leaf.first().waitFor({ state: 'visible', timeout: 5000 });
          if (design === 'list') {
            // the row belongs to the folder just opened: no row of a lower level lies between them
            const idx = Number(await leaf.first().getAttribute('data-index'));
            const between = await scope.evaluate((tree, [from, to, lvl]) => [...tree.querySelectorAll('[role="treeitem"]')]
              .filter((r) => +r.dataset.index > from && +r.dataset.index < to && +r.getAttribute('aria-level') < lvl).length,
            [parentIndex, idx, level]);
            if (!(idx > parentIndex) || between) ok = false;
          }
        } catch { ok = false; }
      }
      found[node.type].tree = ok;
    }
    const top = config.nodes.length ? config.nodes[0].category.split('/')[0] : '';
    if (design === 'list') {  // a virtualised list draws the rows in view: bring the folder to the top
      const folder = page.locator(`${row(top, 1)}:visible`).first();
      await folder.evaluate((el) => el.scrollIntoView({ block: 'start' })).catch(() => {});
      await page.waitForTimeout(300);
    }
    const listed = await page.evaluate(([top, design]) => {
      if (design === 'tree') {
        const folder = [...document.querySelectorAll('li[role="treeitem"][aria-level="1"]')]
          .find((li) => li.getAttribute('aria-label') === top && li.getClientRects().length > 0);
        return folder ? [...folder.querySelectorAll('li.p-tree-node-leaf')].map((li) => li.getAttribute('aria-label')) : null;
      }
      const name = (r) => r.querySelector(':scope > span')?.textContent.trim();
      for (const tree of document.querySelectorAll('[role="tree"]')) {
        const rows = [...tree.querySelectorAll('[role="treeitem"]')].sort((a, b) => a.dataset.index - b.dataset.index);
        const at = rows.findIndex((r) => r.getAttribute('aria-level') === '1' && name(r) === top && r.getClientRects().length > 0);
        if (at < 0) continue;
        const leaves = [];
        for (const r of rows.slice(at + 1)) {
          if (+r.getAttribute('aria-level') <= 1) break;
          if (!r.hasAttribute('aria-expanded')) leaves.push(name(r));
        }
        return leaves;
      }
      return null;
    }, [top, design]);
    await page.screenshot({ path: shotPath('01_node_library') });
    // close the sidebar again so that it does not cover the canvas
    await page.click('button.node-library-tab-button');
    await page.waitForTimeout(300);
    return { found, listed, design };
  });
  mark('node_library');

  // --- each shipped UI workflow, loaded through the frontend, inspected in app.graph ---
  const inspectGraph = () => page.evaluate(() => {
    const graph = window.app.graph;
    const registered = window.LiteGraph.registered_node_types;
    const problems = [];
    // newer frontends keep ids as strings ('12'); the workflow files (and older frontends) use numbers
    const nid = (v) => (typeof v === 'string' && /^-?\d+$/.test(v) ? Number(v) : v);
    const nodes = graph.nodes.map((n) => ({
      id: nid(n.id), type: n.type, registered: !!registered[n.type], has_errors: !!n.has_errors,
      // built from the registered class (an unknown type gets a placeholder node instead)
      placeholder: !(registered[n.type] && n instanceof registered[n.type]),
      // combo values the server does not offer (a model or input file it lacks): newer frontends flag
      // such nodes with has_errors as soon as the workflow loads
      missing_values: (n.widgets || []).filter((w) => {
        const values = typeof w.options?.values === 'function' ? w.options.values() : w.options?.values;
        return w.type === 'combo' && Array.isArray(values) && !values.includes(w.value);
      }).map((w) => [w.name, w.value]),
      widgets: (n.widgets || []).map((w) => [w.name, w.value]),
    }));
    const byId = new Map(graph.nodes.map((n) => [n.id, n]));
    const links = [...(graph.links instanceof Map ? graph.links.values() : Object.values(graph.links || {}))]
      .filter(Boolean);
    for (const l of links) {
      const src = byId.get(l.origin_id);
      const dst = byId.get(l.target_id);
      if (!src) { problems.push(`link ${l.id}: origin node ${l.origin_id} does not exist`); continue; }
      if (!dst) { problems.push(`link ${l.id}: target node ${l.target_id} does not exist`); continue; }
      const out = src.outputs?.[l.origin_slot];
      const inp = dst.inputs?.[l.target_slot];
      if (!out) problems.push(`link ${l.id}: node ${src.id} (${src.type}) has no output slot ${l.origin_slot}`);
      else if (!(out.links || []).includes(l.id)) problems.push(`link ${l.id}: not listed by output ${out.name} of node ${src.id}`);
      if (!inp) problems.push(`link ${l.id}: node ${dst.id} (${dst.type}) has no input slot ${l.target_slot}`);
      else if (inp.link !== l.id) problems.push(`link ${l.id}: input ${inp.name} of node ${dst.id} holds link ${inp.link}`);
      if (out && inp && !window.LiteGraph.isValidConnection(out.type, inp.type)) {
        problems.push(`link ${l.id}: ${out.type} into ${inp.type} (${dst.type}.${inp.name})`);
      }
    }
    const linkIds = new Set(links.map((l) => l.id));
    for (const n of graph.nodes) {
      for (const inp of n.inputs || []) {
        if (inp.link != null && !linkIds.has(inp.link)) problems.push(`node ${n.id} input ${inp.name}: dangling link ${inp.link}`);
      }
      for (const out of n.outputs || []) {
        for (const id of out.links || []) if (!linkIds.has(id)) problems.push(`node ${n.id} output ${out.name}: dangling link ${id}`);
      }
    }
    return { nodes, links: links.map((l) => [nid(l.id), nid(l.origin_id), l.origin_slot, nid(l.target_id), l.target_slot, l.type]), problems };
  });
  const loadWorkflow = async (graph, name) => {
    await page.evaluate(async ([g, name]) => { await window.app.loadGraphData(g, true, true, name); }, [graph, name]);
    await page.waitForTimeout(800);  // the missing-nodes dialog opens after the graph is configured
  };

  result.workflows = {};
  for (const wf of config.workflows) {
    result.workflows[wf.name] = await phase(`workflow:${wf.name}`, async () => {
      await loadWorkflow(wf.graph, wf.name);
      const seen = await dialogs();
      const shown = await notices();
      const graph = await inspectGraph();
      await fitView();
      await page.screenshot({ path: shotPath(`02_workflow_${wf.name.replace(/\.json$/, '')}`) });
      await closeDialogs();
      return { dialogs: seen, notices: shown, ...graph };
    });
  }
  mark('workflows');

  // --- control: the same checks do see a node type the server does not have ---
  if (config.workflows.length) {
    await phase('missing_node_control', async () => {
      const bad = structuredClone(config.workflows[0].graph);
      bad.nodes[0].type = 'TuneAVideoNoSuchNodeForTheTest';
      await loadWorkflow(bad, 'missing_node_control.json');
      await page.waitForFunction(() => [...document.querySelectorAll('.p-dialog, [data-testid="error-overlay"]')]
        .some((d) => d.getClientRects().length && /missing/i.test(d.innerText)), null, { timeout: 5000 }).catch(() => {});
      const seen = await dialogs();
      const shown = await notices();
      const graph = await inspectGraph();
      await page.screenshot({ path: shotPath('03_missing_node_control') });
      await closeDialogs();
      return { dialogs: seen, notices: shown, ...graph };
    });
  }

  // --- the demo workflow, small, queued from the UI; its video preview must appear on the page ---
  if (config.run) {
    const run = config.run;
    result.run = await phase('run', async () => {
      await loadWorkflow(run.graph, run.name);
      await closeDialogs();
      const set = await page.evaluate((widgets) => {
        const missing = [];
        for (const [type, name, value] of widgets) {
          const nodes = window.app.graph.nodes.filter((n) => n.type === type);
          const ws = nodes.map((n) => (n.widgets || []).find((w) => w.name === name)).filter(Boolean);
          if (!ws.length) missing.push(`${type}.${name}`);
          for (const w of ws) { w.value = value; w.callback?.(value); }
        }
        window.app.graph.setDirtyCanvas(true, true);
        window.__tavEvents = [];
        for (const t of ['execution_start', 'executed', 'execution_error', 'execution_success',
                         'execution_interrupted', 'execution_cached']) {
          window.app.api.addEventListener(t, (e) => window.__tavEvents.push({ type: t, detail: e.detail }));
        }
        return { missing };
      }, run.widgets);
      if (set.missing.length) throw new Error(`widgets not found: ${set.missing.join(', ')}`);
      await fitView();
      const before = prompts.length;
      let queuedVia = 'Run button';
      const runButton = page.locator('button[aria-label="Run"], button[data-testid="queue-button"]').first();
      if (await runButton.count()) await runButton.click();
      else { queuedVia = 'app.queuePrompt'; await page.evaluate(() => window.app.queuePrompt(0, 1)); }
      mark('queued');
      // until the server ends the prompt (or refuses it: then no execution event ever comes)
      const deadline = Date.now() + run.timeout_ms;
      let response = null;
      for (;;) {
        response = promptResponses[promptResponses.length - 1] ?? null;
        if (response && response.status !== 200) break;
        const done = await page.evaluate(() => window.__tavEvents.some((e) =>
          ['execution_success', 'execution_error', 'execution_interrupted'].includes(e.type)));
        if (done) break;
        if (Date.now() > deadline) throw new Error(`the prompt did not finish within ${run.timeout_ms} ms`);
        await page.waitForTimeout(250);
      }
      mark('executed');
      const events = await page.evaluate(() => window.__tavEvents.map((e) => ({ type: e.type,
        detail: JSON.parse(JSON.stringify(e.detail ?? null)) })));
      const prompt = prompts.length > before ? JSON.parse(prompts[prompts.length - 1]) : null;
      const seen = await dialogs();
      const out = { queued_via: queuedVia, events, prompt: prompt && prompt.prompt, prompt_response: response, dialogs: seen };
      if (!events.some((e) => e.type === 'execution_success')) return out;
      // the preview: a <video> (or an animated <img>) showing /view?filename=<the saved file>
      const selector = 'video[src*="/view?"][src*="filename="], img[src*="/view?"][src*="filename="]';
      const preview = page.locator(selector).first();
      try {
        await preview.waitFor({ state: 'attached', timeout: 10000 });
      } catch {
        // DOM widgets are only drawn for nodes in view: centre on the output node and look again
        await page.evaluate((type) => {
          const node = window.app.graph.nodes.find((n) => n.type === type);
          window.app.canvas.ds.scale = 1;
          window.app.canvas.centerOnNode(node);
          window.app.canvas.setDirty(true, true);
        }, run.output_type);
        await preview.waitFor({ state: 'attached', timeout: 15000 });
      }
      await page.waitForFunction((sel) => {
        const el = document.querySelector(sel);
        return el && (el.tagName === 'VIDEO' ? el.readyState >= 2 : el.complete);
      }, selector, { timeout: 15000 }).catch(() => {});
      await page.waitForTimeout(500);
      out.preview = await page.evaluate((sel) => [...document.querySelectorAll(sel)].map((el) => ({
        tag: el.tagName.toLowerCase(), src: el.getAttribute('src'), ready_state: el.readyState ?? null,
        width: el.tagName === 'VIDEO' ? el.videoWidth : el.naturalWidth,
        height: el.tagName === 'VIDEO' ? el.videoHeight : el.naturalHeight,
        visible: el.getClientRects().length > 0,
      })), selector);
      await page.screenshot({ path: shotPath(`04_run_${run.name.replace(/\.json$/, '')}`) });
      mark('preview');
      return out;
    });
  }

  // --- one node's help page in the frontend's node documentation panel ---
  // A user selects the node on the canvas and presses the selection toolbox's info button; the frontend
  // fetches /extensions/<pack>/docs/<Node>.md and renders it (1.3x: the Node Library sidebar; 1.4x: the
  // right side panel). Its text and its picture (relative to the docs folder) must appear.
  if (config.help) {
    const help = config.help;
    await phase('node_help', async () => {
      await page.evaluate(() => window.app.extensionManager.setting.set('Comfy.Canvas.SelectionToolbox', true))
        .catch(() => {});
      const helpRequests = [];
      const onRequest = (r) => { if (r.url().includes('/docs/')) helpRequests.push(new URL(r.url()).pathname); };
      page.on('request', onRequest);
      await page.evaluate((type) => {
        window.app.graph.clear();
        const node = window.LiteGraph.createNode(type);
        node.pos = [100, 100];
        window.app.graph.add(node);
        window.app.canvas.selectNode(node);
        window.app.canvas.setDirty(true, true);
      }, help.type);
      await fitView();
      const info = page.locator('[data-testid="info-button"]:visible').first();
      try {
        await info.waitFor({ state: 'visible', timeout: 5000 });
      } catch {
        // select it with the mouse, as a user would: a click on the node's title bar
        const at = await page.evaluate(() => {
          const node = window.app.graph.nodes[0];
          const rect = window.app.canvas.canvas.getBoundingClientRect();
          const [x, y] = window.app.canvas.ds.convertOffsetToCanvas([node.pos[0] + 40, node.pos[1] - 15]);
          return [rect.left + x, rect.top + y];
        });
        await page.mouse.click(at[0], at[1]);
        await info.waitFor({ state: 'visible', timeout: 10000 });
      }
      await info.click();
      await page.waitForFunction((text) => document.body.innerText.replace(/\s+/g, ' ').includes(text),
        help.text, { timeout: 20000 });
      await page.waitForFunction((image) => [...document.querySelectorAll('img')]
        .some((i) => i.getAttribute('src')?.endsWith(`/docs/${image}`) && i.complete && i.naturalWidth > 0),
      help.image, { timeout: 15000 }).catch(() => {});
      const shown = await page.evaluate(([text, image]) => {
        const norm = (t) => t.replace(/\s+/g, ' ');
        // the innermost visible element holding the text: where the page was rendered
        const holders = [...document.querySelectorAll('body *')]
          .filter((el) => el.getClientRects().length && norm(el.innerText || '').includes(text));
        const holder = holders[holders.length - 1];
        const panel = holder?.closest('.p-tree, [class*="sidebar"], [class*="panel"], aside, [role="dialog"]') ?? holder;
        return {
          text_visible: !!holder,
          panel_text: panel ? norm(panel.innerText).slice(0, 1500) : null,
          images: [...document.querySelectorAll('img')].filter((i) => i.getAttribute('src')?.includes('/docs/'))
            .map((i) => ({ src: i.getAttribute('src'), width: i.naturalWidth, visible: i.getClientRects().length > 0 })),
        };
      }, [help.text, help.image]);
      page.off('request', onRequest);
      await page.screenshot({ path: shotPath('05_node_help') });
      await page.keyboard.press('Escape');
      mark('node_help');
      return { ...shown, requests: helpRequests };
    });
  }

  // --- the pack's templates, each opened from the Templates browser like a user does ---
  // The browser's navigation lists each custom node pack under "Extensions" by its folder name; its
  // cards ([data-testid=template-workflow-<name>]) fetch the thumbnail from
  // /api/workflow_templates/<module>/<name>.jpg and show it as a blob: URL.
  if (config.templates) {
    const { module, names } = config.templates;
    const thumbResponses = {};
    page.on('response', (r) => {
      const m = new URL(r.url()).pathname.match(/\/workflow_templates\/([^/]+)\/([^/]+)\.jpg$/);
      if (m && decodeURIComponent(m[1]) === module) thumbResponses[decodeURIComponent(m[2])] = r.status();
    });
    const card = (name) => page.locator(`[data-testid="template-workflow-${name}"]`).first();
    const openPackTemplates = async () => {
      await page.evaluate(() => window.app.extensionManager.command.execute('Comfy.BrowseTemplates'));
      const search = page.locator('input[placeholder^="Search"]:visible').first();
      await search.waitFor({ state: 'visible', timeout: 20000 });
      await search.fill('');
      await page.waitForTimeout(500);  // the dialog's opening transition
      // reopened, the browser may still show the pack's entry: its cards are then in view already
      if (await card(names[0]).isVisible()) return;
      const entry = page.locator(`[role="dialog"] :text-is(${JSON.stringify(module)}):visible`).first();
      if (!(await entry.count())) {  // the Extensions group may start collapsed
        await page.locator('[role="dialog"] :text-is("Extensions"):visible').first().click({ timeout: 10000 });
      }
      // a DOM click: under load the dialog's transitions keep Playwright's "stable" check waiting
      await entry.waitFor({ state: 'visible', timeout: 10000 });
      await entry.evaluate((el) => { el.scrollIntoView({ block: 'center' }); el.click(); });
      await card(names[0]).waitFor({ state: 'visible', timeout: 15000 });
    };
    result.templates = {};
    await phase('templates_browser', async () => {
      await page.evaluate(() => window.app.graph.clear());
      await openPackTemplates();
      await page.waitForFunction((names) => names.every((n) => [...document.querySelectorAll(
        `[data-testid="template-workflow-${n}"] img`)].some((i) => i.complete && i.naturalWidth > 0)),
      names, { timeout: 20000 }).catch(() => {});
      const cards = await page.evaluate(() => [...document.querySelectorAll('[data-testid^="template-workflow-"]')]
        .filter((el) => el.getClientRects().length)
        .map((el) => ({ name: el.dataset.testid.replace('template-workflow-', ''),
          images: [...el.querySelectorAll('img')].map((i) => ({ src: (i.getAttribute('src') || '').slice(0, 120),
            width: i.naturalWidth, height: i.naturalHeight })) })));
      await page.screenshot({ path: shotPath('06_templates') });
      // a click on the first card opens it (the dialog closes, the graph is the template's)
      await card(names[0]).evaluate((el) => el.click());
      await page.waitForFunction(() => window.app.graph.nodes.length > 0, null, { timeout: 30000 });
      await card(names[0]).waitFor({ state: 'hidden', timeout: 10000 }).catch(() => {});
      await page.waitForTimeout(800);  // the missing-nodes dialog opens after the graph is configured
      const clicked = { name: names[0], dialogs: await dialogs(), notices: await notices(), ...(await inspectGraph()) };
      await page.screenshot({ path: shotPath(`06_template_${names[0]}_clicked`) });
      await closeDialogs();
      mark('templates_browser');
      return { cards, thumbnail_status: thumbResponses, clicked };
    });
    // every template the way the browser loads a custom node's template: its listing, its file, the canvas
    // (reopening the browser for each would redraw all its core cards: minutes on a loaded machine)
    for (const name of names) {
      result.templates[name] = await phase(`template:${name}`, async () => {
        const listed = await page.evaluate(async ([module, name]) => {
          window.app.graph.clear();
          const listing = await (await window.app.api.fetchApi('/workflow_templates')).json();
          const graph = await (await window.app.api.fetchApi(`/workflow_templates/${module}/${name}.json`)).json();
          await window.app.loadGraphData(graph, true, true, name);
          return listing[module] ?? null;
        }, [module, name]);
        await page.waitForTimeout(800);  // the missing-nodes dialog opens after the graph is configured
        const seen = await dialogs();
        const shown = await notices();
        const graph = await inspectGraph();
        await fitView();
        await page.screenshot({ path: shotPath(`06_template_${name}`) });
        await closeDialogs();
        mark(`template:${name}`);
        return { listed, dialogs: seen, notices: shown, ...graph };
      });
    }
  }
} catch (e) {
  result.fatal = String(e && e.stack || e).slice(0, 3000);
} finally {
  mark('done');
  save();
  await browser.close();
}
