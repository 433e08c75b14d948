// forkd-agent eval driver for JavaScript. Runs inside the long-lived Node process the agent
// starts with `<interpreter> -e <this file> <request fd> <reply fd>`. It speaks the protocol of
// eval_driver.py (see there) on two pipes the agent passes by number: one JSON object per line
// read from the request fd, one JSON object per line written to the reply fd. Node's own fds 0,
// 1 and 2 are /dev/null and the agent's log, so neither user code nor a child process it starts
// with inherited stdio can write into the protocol.
//
// Evaluation goes through V8's inspector in REPL mode (`Runtime.evaluate` with `replMode`), as
// a browser's developer console does: top-level `await` works, `const`/`let`/`class`
// declarations persist into later evals of the same context, and the value of the last
// expression is the completion value. Each context is a `vm` context of its own (globals apart;
// the Node process, its modules, `process.env` and the event loop shared), with `require`
// resolving from the context's first directory and then NODE_PATH.
//
// Output: `console` (ours, in every context and the main realm) and `process.stdout` /
// `process.stderr` writes go to the eval running at the time, or to the agent's log between
// evals. Errors answer {"type": name, "message", "traceback": stack without the driver's frames}.
'use strict';
(() => {
  const fs = require('fs');
  const path = require('path');
  const util = require('util');
  const vm = require('vm');
  const inspector = require('inspector');
  const { Console } = require('console');
  const { createRequire } = require('module');
  const readline = require('readline');
  const net = require('net');
  const crypto = require('crypto');

  const LIMITS = { stdout: 256 * 1024, stderr: 64 * 1024, value: 256 * 1024, traceback: 64 * 1024 };
  // The agent refuses replies above 1 MiB; this leaves room for its envelope.
  const REPLY_LIMIT = (1 << 20) - 16 * 1024;
  const EVENT_TEXT = 32 * 1024;
  const FLUSH_DELAY_MS = 100;
  const DEFAULT_CONTEXT = 'default';
  // How evaluated code hands its value or exception back to the driver (see `handOff`).
  const HANDOFF = Symbol.for('forkd.eval.handoff');

  const requestFd = Number(process.argv[1]);
  const replyFd = Number(process.argv[2]);
  const logWrite = process.stderr.write.bind(process.stderr);

  function clean(text, limit) {
    // Lone surrogates cannot travel as UTF-8; toWellFormed is Node 20+, so replace by hand.
    text = String(text).replace(/[\ud800-\udbff](?![\udc00-\udfff])|(?<![\ud800-\udbff])[\udc00-\udfff]/g, '\ufffd');
    if (text.length > limit) {
      text = `${text.slice(0, limit)}\n...[truncated ${text.length - limit} characters]`;
    }
    return text;
  }

  class Failure extends Error {
    constructor(code, message) {
      super(message);
      this.code = code;
    }
  }

  function send(message) {
    const data = Buffer.from(`${JSON.stringify(message)}\n`);
    let off = 0;
    while (off < data.length) {
      try {
        off += fs.writeSync(replyFd, data, off);
      } catch (e) {
        if (e.code !== 'EAGAIN') throw e;
      }
    }
  }

  // --------------------------------------------------------------------------------------------
  // Output routing

  class Run {
    constructor(stream) {
      this.stream = stream;
      this.captured = { stdout: [], stderr: [] };
      this.sizes = { stdout: 0, stderr: 0 };
      this.results = [];
    }

    capture(name, text) {
      // Keep a little past the limit so the reply can say how much was cut.
      const room = LIMITS[name] + 1 - this.sizes[name];
      if (room > 0) this.captured[name].push(text.slice(0, room));
      this.sizes[name] += text.length;
    }

    capturedText(name) {
      const text = this.captured[name].join('');
      const kept = clean(text, LIMITS[name]);
      const cut = this.sizes[name] - text.length;
      return cut > 0 && !kept.endsWith('characters]') ? `${kept}\n...[truncated ${cut} characters]` : kept;
    }
  }

  // Where output goes: the running eval (captured, or sent as events coalesced into lines; a
  // partial line waits up to FLUSH_DELAY_MS) or, outside an eval, the agent's log.
  const router = {
    run: null,
    pendingName: null,
    pending: '',
    timer: null,

    write(name, text) {
      const run = this.run;
      if (run === null) {
        logWrite(text);
      } else if (!run.stream) {
        run.capture(name, text);
      } else {
        if (this.pending && this.pendingName !== name) this.sendPending();
        this.pendingName = name;
        this.pending += text;
        if (text.includes('\n') || this.pending.length >= EVENT_TEXT) {
          this.sendPending();
        } else if (this.timer === null) {
          this.timer = setTimeout(() => this.sendPending(), FLUSH_DELAY_MS);
        }
      }
    },

    sendPending() {
      if (this.timer !== null) {
        clearTimeout(this.timer);
        this.timer = null;
      }
      const text = this.pending;
      this.pending = '';
      for (let start = 0; start < text.length; start += EVENT_TEXT) {
        send({ event: this.pendingName, text: clean(text.slice(start, start + EVENT_TEXT), EVENT_TEXT) });
      }
    },

    begin(run) {
      this.run = run;
    },

    end() {
      this.sendPending();
      this.run = null;
    },

    note(text) {
      this.write('stderr', `${text}\n`);
    },
  };

  function chunkText(chunk, encoding) {
    if (typeof chunk === 'string') return chunk;
    return Buffer.from(chunk).toString(typeof encoding === 'string' ? encoding : 'utf8');
  }

  // process.stdout / process.stderr keep their identity (libraries hold them); only their
  // write goes through the router.
  for (const name of ['stdout', 'stderr']) {
    process[name].write = (chunk, encoding, callback) => {
      router.write(name, chunkText(chunk, encoding));
      const done = typeof encoding === 'function' ? encoding : callback;
      if (typeof done === 'function') process.nextTick(done);
      return true;
    };
  }
  // A console of our own: the global one also reports every call to the inspector session,
  // which would keep the logged objects alive.
  const driverConsole = new Console({ stdout: process.stdout, stderr: process.stderr });
  globalThis.console = driverConsole;

  // Errors nobody awaited (a timer's callback, a forgotten promise) are reported on the running
  // eval's stderr, or logged, instead of ending the process and every context with it.
  process.on('uncaughtException', (err) => router.note(`forkd: uncaught ${describeThrown(err)}`));
  process.on('unhandledRejection', (err) => router.note(`forkd: unhandled rejection ${describeThrown(err)}`));

  function describeThrown(value) {
    return value && typeof value.stack === 'string' ? value.stack : util.inspect(value);
  }

  // --------------------------------------------------------------------------------------------
  // The inspector session evaluating code in REPL mode

  const session = new inspector.Session();
  session.connect();
  const contextIds = new Map();
  session.on('Runtime.executionContextCreated', (message) => {
    contextIds.set(message.params.context.name, message.params.context.id);
  });

  function post(method, params) {
    return new Promise((resolve, reject) => {
      session.post(method, params, (err, result) => (err ? reject(err) : resolve(result)));
    });
  }

  // --------------------------------------------------------------------------------------------
  // Display formats

  function isPlainData(value) {
    if (Array.isArray(value)) return true;
    if (value === null || typeof value !== 'object') return false;
    const proto = Object.getPrototypeOf(value);
    // Any realm's Object.prototype: contexts have their own.
    return proto === null || (Object.getPrototypeOf(proto) === null && proto.constructor && proto.constructor.name === 'Object');
  }

  function jsonForm(value) {
    if (!isPlainData(value)) return undefined;
    try {
      const text = JSON.stringify(value);
      return text !== undefined && text.length <= LIMITS.value ? JSON.parse(text) : undefined;
    } catch {
      return undefined; // cycles, BigInts
    }
  }

  function bundle(value, text) {
    const data = { 'text/plain': clean(text === undefined ? util.inspect(value) : text, LIMITS.value) };
    const json = jsonForm(value);
    if (json !== undefined) data['application/json'] = json;
    return data;
  }

  function displayFunction() {
    // display(...values): each value as a result of the running eval (Jupyter's display);
    // display(bundle, {raw: true}) shows a {mime: data} bundle as it is.
    return function display(...values) {
      const run = router.run;
      if (run === null) return;
      const last = values[values.length - 1];
      const raw = values.length === 2 && last && last.raw === true && isPlainData(values[0]);
      const shown = raw ? [values[0]] : values;
      for (const value of shown) {
        const data = raw ? { ...value } : bundle(value);
        if (raw && typeof data['text/plain'] !== 'string') data['text/plain'] = util.inspect(value);
        run.results.push({ data, is_main: false });
      }
    };
  }

  function formatError(thrown, code, filename, details) {
    if (thrown !== null && typeof thrown === 'object' && typeof thrown.stack === 'string') {
      const name = typeof thrown.name === 'string' ? thrown.name : thrown.constructor.name;
      let stack = trimStack(thrown.stack);
      if (name === 'SyntaxError' && details && !stack.includes(filename)) {
        stack += `\n    at ${syntaxErrorPlace(code, filename, details)}`;
      }
      return {
        type: name,
        message: clean(String(thrown.message), LIMITS.traceback),
        traceback: clean(stack, LIMITS.traceback),
      };
    }
    // `throw 'text'` and the like: no name, no stack.
    const text = util.inspect(thrown);
    return { type: 'Uncaught', message: clean(text, LIMITS.traceback), traceback: clean(`Uncaught ${text}`, LIMITS.traceback) };
  }

  // V8 gives a syntax error no frame: say where it is. Past the end of the code (on the
  // sourceURL line the driver appends) it is the end of the code.
  function syntaxErrorPlace(code, filename, details) {
    const lines = code.split('\n');
    if (details.lineNumber >= lines.length) {
      return `${filename}:${lines.length}:${lines[lines.length - 1].length + 1}`;
    }
    return `${filename}:${details.lineNumber + 1}:${details.columnNumber + 1}`;
  }

  function trimStack(stack) {
    // The driver's frames (the inspector call and this file, run as [eval]) are the outermost.
    const lines = stack.split('\n');
    const first = lines.findIndex((line) => /^\s+at .*(node:inspector|\[eval\])/.test(line));
    return (first < 0 ? lines : lines.slice(0, first)).join('\n');
  }

  function fit(reply, run) {
    // Leaves out the largest display formats until the reply fits the agent's limit.
    while (JSON.stringify(reply).length > REPLY_LIMIT) {
      let largest = null;
      for (const result of reply.results) {
        for (const [mime, value] of Object.entries(result.data)) {
          const size = JSON.stringify(value).length;
          if (largest === null || size > largest.size) largest = { size, result, mime };
        }
      }
      if (largest === null || largest.size <= 1024) break;
      if (largest.mime === 'text/plain') {
        largest.result.data[largest.mime] = clean(largest.result.data[largest.mime], 512);
      } else {
        delete largest.result.data[largest.mime];
      }
      const note = `forkd: a result's ${largest.mime} (${largest.size} bytes) was left out: an eval's reply is limited to ${REPLY_LIMIT} bytes\n`;
      if (run.stream) send({ event: 'stderr', text: note });
      else reply.stderr += note;
    }
  }

  // --------------------------------------------------------------------------------------------
  // Contexts

  // Node's globals (process, Buffer, timers, URL, fetch, the built-in modules `node -e` offers
  // by name, ...) that a bare vm context lacks. Lazy ones stay lazy: their getters are copied,
  // so nothing is loaded before a context uses it.
  function copyNodeGlobals(sandbox, present) {
    for (const name of Object.getOwnPropertyNames(globalThis)) {
      if (present.has(name) || ['globalThis', 'global', 'console', 'require'].includes(name)) continue;
      const descriptor = Object.getOwnPropertyDescriptor(globalThis, name);
      if (descriptor.get || descriptor.set) {
        Object.defineProperty(sandbox, name, { get: descriptor.get, set: descriptor.set, configurable: true });
      } else {
        sandbox[name] = descriptor.value;
      }
    }
  }

  let contextNumber = 0;

  class Context {
    constructor(id, cwd) {
      this.id = id;
      this.home = cwd;
      this.cwd = cwd;
      this.count = 0;
      this.fresh();
    }

    fresh() {
      const name = `forkd-eval-context-${++contextNumber}`;
      const sandbox = {};
      this.global = vm.createContext(sandbox, { name });
      copyNodeGlobals(sandbox, new Set(vm.runInContext('Object.getOwnPropertyNames(globalThis)', this.global)));
      sandbox.global = this.global;
      sandbox.console = driverConsole;
      sandbox.display = displayFunction();
      sandbox.require = createRequire(path.join(this.home, '[forkd-eval]'));
      Object.defineProperty(sandbox, HANDOFF, { value: handOff, enumerable: false });
      this.inspectorId = contextIds.get(name);
      if (this.inspectorId === undefined) throw new Error(`the inspector did not report context ${name}`);
    }

    restart() {
      this.fresh();
      this.count = 0;
      this.cwd = this.home;
    }

    info() {
      return { id: this.id, language: 'javascript', cwd: this.cwd, execution_count: this.count };
    }
  }

  let handedOff;
  function handOff(value) {
    handedOff = value;
  }

  // The evaluated value (or exception) as the inspector describes it, fetched as the object
  // itself: passed to the context's hand-off function.
  async function fetchRemote(remote, ctx) {
    const argument = {};
    if (remote.objectId !== undefined) argument.objectId = remote.objectId;
    else if (remote.unserializableValue !== undefined) argument.unserializableValue = remote.unserializableValue;
    else if (remote.type !== 'undefined') argument.value = remote.value;
    handedOff = undefined;
    await post('Runtime.callFunctionOn', {
      functionDeclaration: `function (v) { globalThis[Symbol.for('forkd.eval.handoff')](v); }`,
      executionContextId: ctx.inspectorId,
      arguments: [argument],
      objectGroup: 'forkd',
    });
    // Boxed: returning a promise from this async function would await it.
    const box = { value: handedOff };
    handedOff = undefined;
    return box;
  }

  // --------------------------------------------------------------------------------------------
  // The driver

  class Driver {
    constructor() {
      this.home = process.cwd();
      this.contexts = new Map([[DEFAULT_CONTEXT, new Context(DEFAULT_CONTEXT, this.home)]]);
      this.number = 0;
    }

    context(id) {
      const ctx = this.contexts.get(id || DEFAULT_CONTEXT);
      if (ctx === undefined) throw new Failure('not_found', `no context ${JSON.stringify(id)} in this interpreter`);
      return ctx;
    }

    contextOp(message) {
      const action = message.action;
      if (action === 'list') return { contexts: [...this.contexts.values()].map((c) => c.info()) };
      if (action === 'create') {
        let cwd = message.cwd;
        if (cwd === undefined || cwd === null) cwd = ['/home/user', '/root', '/'].find(isDirectory);
        cwd = path.resolve(this.home, cwd);
        if (!isDirectory(cwd)) throw new Failure('bad_request', `cwd ${JSON.stringify(cwd)} is not a directory`);
        const ctx = new Context(crypto.randomUUID(), cwd);
        this.contexts.set(ctx.id, ctx);
        return { contexts: [ctx.info()] };
      }
      const ctx = this.context(message.context);
      if (action === 'restart') {
        ctx.restart();
        return { contexts: [ctx.info()] };
      }
      if (action === 'remove') {
        if (ctx.id === DEFAULT_CONTEXT) throw new Failure('bad_request', 'the default context cannot be removed (restart it to clear it)');
        this.contexts.delete(ctx.id);
        return { contexts: [ctx.info()] };
      }
      throw new Failure('bad_request', `unknown context action ${JSON.stringify(action)}`);
    }

    async evaluate(message) {
      const ctx = this.context(message.context);
      const stream = Boolean(message.stream);
      const savedEnv = applyEnv(message.env || {});
      if (stream) send({ event: 'started' });
      if (message.count !== false) ctx.count += 1;
      this.number += 1;
      const filename = `<eval-${this.number}>`;
      const run = new Run(stream);
      router.begin(run);
      enter(ctx);
      let value = null;
      let error = null;
      try {
        ({ value, error } = await this.evaluateIn(ctx, message.code, filename, run));
      } finally {
        leave(ctx, this.home);
        restoreEnv(savedEnv);
        post('Runtime.releaseObjectGroup', { objectGroup: 'forkd' }).catch(() => {});
      }
      router.sendPending();
      const reply = {
        value: value === null ? null : clean(value, LIMITS.value),
        stdout: stream ? '' : run.capturedText('stdout'),
        stderr: stream ? '' : run.capturedText('stderr'),
        error,
        results: run.results,
        execution_count: ctx.count,
      };
      fit(reply, run);
      router.end();
      return reply;
    }

    async evaluateIn(ctx, code, filename, run) {
      const answer = await post('Runtime.evaluate', {
        expression: `${code}\n//# sourceURL=${filename}`,
        contextId: ctx.inspectorId,
        replMode: true,
        awaitPromise: true,
        objectGroup: 'forkd',
      });
      if (answer.exceptionDetails) {
        const thrown = answer.exceptionDetails.exception
          ? (await fetchRemote(answer.exceptionDetails.exception, ctx)).value
          : new Error(answer.exceptionDetails.text);
        return { value: null, error: formatError(thrown, code, filename, answer.exceptionDetails) };
      }
      const result = (await fetchRemote(answer.result, ctx)).value;
      // Like Node's REPL, minus the noise: undefined (a statement, console.log()) shows nothing.
      if (result === undefined) return { value: null, error: null };
      const text = util.inspect(result);
      run.results.push({ data: bundle(result, text), is_main: true });
      return { value: text, error: null };
    }
  }

  function isDirectory(dir) {
    try {
      return fs.statSync(dir).isDirectory();
    } catch {
      return false;
    }
  }

  function enter(ctx) {
    try {
      process.chdir(ctx.cwd);
    } catch (e) {
      router.note(`forkd: context ${ctx.id}: cannot enter ${ctx.cwd} (${e.message}); running in ${process.cwd()}`);
    }
  }

  function leave(ctx, home) {
    try {
      ctx.cwd = process.cwd();
    } catch {
      // its directory was removed: keep the last known one
    }
    try {
      process.chdir(home);
    } catch {
      // nowhere better to go
    }
  }

  function applyEnv(env) {
    const saved = {};
    for (const [key, value] of Object.entries(env)) {
      if (key === '' || key.includes('=') || key.includes('\0') || String(value).includes('\0')) {
        restoreEnv(saved);
        throw new Failure('bad_request', `environment variable ${JSON.stringify(key)}: not a valid name or value`);
      }
      saved[key] = Object.prototype.hasOwnProperty.call(process.env, key) ? process.env[key] : undefined;
      process.env[key] = value;
    }
    return saved;
  }

  function restoreEnv(saved) {
    for (const [key, value] of Object.entries(saved)) {
      if (value === undefined) delete process.env[key];
      else process.env[key] = value;
    }
  }

  // Every forked child starts with its parent's Math.random state (V8 seeds it once per
  // context): after a restore, each context's Math.random becomes a generator seeded from the
  // kernel, which the restore hook has reseeded.
  function reseed(driver) {
    const seed = new Uint32Array(4);
    const fd = fs.openSync('/dev/urandom', 'r');
    try {
      fs.readSync(fd, seed, 0, 16, null);
    } finally {
      fs.closeSync(fd);
    }
    const random = xoshiro128(seed);
    Math.random = random;
    for (const ctx of driver.contexts.values()) {
      vm.runInContext('Math', ctx.global).random = random;
    }
    return { reseeded: ['Math.random'] };
  }

  function xoshiro128(s) {
    if ((s[0] | s[1] | s[2] | s[3]) === 0) s[0] = 1;
    const next = () => {
      const result = Math.imul(rotl(Math.imul(s[1], 5), 7), 9) >>> 0;
      const t = s[1] << 9;
      s[2] ^= s[0];
      s[3] ^= s[1];
      s[1] ^= s[2];
      s[0] ^= s[3];
      s[2] ^= t;
      s[3] = rotl(s[3], 11);
      return result;
    };
    // 53 random bits, as V8's own Math.random gives.
    return function random() {
      return ((next() >>> 5) * 67108864 + (next() >>> 6)) / 9007199254740992;
    };
  }

  function rotl(x, k) {
    return (x << k) | (x >>> (32 - k));
  }

  async function handle(driver, line) {
    try {
      const message = JSON.parse(line);
      if (message.op === 'eval') return await driver.evaluate(message);
      if (message.op === 'context') return driver.contextOp(message);
      if (message.op === 'reseed') return reseed(driver);
      return { driver_error: `unknown driver op ${JSON.stringify(message.op)}` };
    } catch (e) {
      if (e instanceof Failure) return { fail: { code: e.code, message: e.message } };
      router.end();
      return { driver_error: `${e && e.name}: ${e && e.message}` };
    }
  }

  async function main() {
    await post('Runtime.enable', {});
    const driver = new Driver();
    // A socket-style stream (polled by the event loop): a file stream's read would sit in the
    // thread pool, and process.exit() waits for the thread pool.
    const input = new net.Socket({ fd: requestFd, readable: true, writable: false });
    const lines = readline.createInterface({ input, crlfDelay: Infinity });
    // One request at a time: the agent waits for each reply before it sends the next.
    for await (const line of lines) {
      send(await handle(driver, line));
    }
    process.exit(0);
  }

  main().catch((e) => {
    logWrite(`forkd eval driver failed: ${describeThrown(e)}\n`);
    process.exit(70);
  });
})();
