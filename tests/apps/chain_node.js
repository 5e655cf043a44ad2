// An event-loop HTTP service for the causality scenario (uninstrumented).
//   node chain_node.js PORT LEAF_BASE_URL
// GET /<anything>/<id> calls LEAF/leaf/<id> over a keep-alive agent, then answers.
const http = require("http");

const port = Number(process.argv[2]);
const leaf = new URL(process.argv[3]);
const agent = new http.Agent({ keepAlive: true, maxSockets: 32 });

http
  .createServer((req, res) => {
    const id = req.url.replace(/\/$/, "").split("/").pop();
    http
      .get({ host: leaf.hostname, port: leaf.port, path: `/leaf/${id}`, agent }, (up) => {
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
