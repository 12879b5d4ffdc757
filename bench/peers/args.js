'use strict';
// The command line every JavaScript peer takes: [--host 127.0.0.1] [--port 8000], or HOST /
// PORT in the environment.

function parseArgs(argv) {
  const opts = { host: process.env.HOST || '127.0.0.1', port: Number(process.env.PORT || 8000) };
  for (let i = 0; i < argv.length; i++) {
    if (argv[i] === '--host') opts.host = argv[++i];
    else if (argv[i] === '--port') opts.port = Number(argv[++i]);
    else throw new Error(`unknown argument: ${argv[i]}`);
  }
  return opts;
}

module.exports = { parseArgs };
