// An event-loop HTTP service for the causality scenarios (uninstrumented).
//   node chain_node.js PORT LEAF_BASE_URL [--derive]
// GET /<anything>/<id> calls LEAF/leaf/<id> over a keep-alive agent, then answers. With
// --derive it calls LEAF/leaf/<derive(id)> instead (the runtimes scenario's id function).
const http = require("http");

const port = Number(process.argv[2]);
const leaf = new URL(process.argv[3]);
const agent = new http.Agent({ keepAlive: true, maxSockets: 32 });
const derive = process.argv[4] === "--derive" ? (id) => String((Number(id) * 7919 + 13) % 1000003) : (id) => id;

http
  .createServer((req, res) => {
    const id = req.url.replace(/\/$/, "").split("/").pop();
    http
      .get({ host: leaf.hostname, port: leaf.port, path: `/leaf/${derive(id)}`, agent }, (up) => {
        let body = "";
        up.on("data", (c) => (body += c));
        up.on("end", () => {
          res.writeHead(200, { "Content-Length": Buffer.byteLength(body) });
          res.end(body);
        });
      })
      .on("error", (e) => {
        res.writeHead(502);
        res.end(String(e));
      });
  })
  .listen(port, "127.0.0.1");
