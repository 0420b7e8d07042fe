/**
 * CFR-SAM nuclei segmentation for QuPath (0.4 or later), over the gateway's HTTP/JSON API.
 *
 * Sends the selected annotation's region (or, with nothing selected, the whole image) to
 * POST /v1/segment/geojson and adds the nuclei it gets back as detections: outlines in the
 * image's full-resolution coordinates, QuPath class names (Other, Immune cells, Stroma, ...) and
 * measurements (Nucleus ID, Area µm^2, Length µm, Max/Min diameter µm, Circularity, Solidity...).
 * Step-by-step use: clients/qupath/README.md.
 */
import java.net.URI
import java.net.http.HttpClient
import java.net.http.HttpRequest
import java.net.http.HttpResponse
import java.nio.file.Files
import java.time.Duration
import javax.imageio.ImageIO
import qupath.lib.io.GsonTools
import qupath.lib.io.PathIO
import qupath.lib.regions.RegionRequest

// ---- Settings --------------------------------------------------------------------------------
def GATEWAY = 'http://localhost:8080'   // cfrsam stack --http-port 8080 (https:// with TLS)
def TOKEN = ''                          // bearer token, when the gateway checks tokens
def CLASSES = ''                        // class mapping, e.g. 'epithelial=Tumor' ('' = default)
def MIN_SCORE = 0.0                     // drop nuclei scoring below this
def CELLS_UM = 0.0                      // > 0: grow each nucleus by this many µm into a cell object
def TIMEOUT_S = 600
// ------------------------------------------------------------------------------------------------

def imageData = getCurrentImageData()
if (imageData == null) { println 'cfrsam: open an image first'; return }
def server = imageData.getServer()
def cal = server.getPixelCalibration()
double fullMpp = cal.hasPixelSizeMicrons() ? cal.getAveragedPixelSizeMicrons() : 0.0

def http = HttpClient.newBuilder().connectTimeout(Duration.ofSeconds(10)).build()
def call = { String method, String route, String body ->
    def builder = HttpRequest.newBuilder(URI.create(GATEWAY + route)).timeout(Duration.ofSeconds(TIMEOUT_S))
    if (TOKEN) builder.header('authorization', 'Bearer ' + TOKEN)
    if (body == null) builder.GET()
    else builder.header('content-type', 'application/json').POST(HttpRequest.BodyPublishers.ofString(body))
    return http.send(builder.build(), HttpResponse.BodyHandlers.ofString())
}

// The model's resolution: read the region at (about) that resolution, never finer than the image.
def modelResponse = call('GET', '/v1/model', null)
if (modelResponse.statusCode() != 200) { println "cfrsam: ${GATEWAY}/v1/model answered ${modelResponse.statusCode()}: ${modelResponse.body()}"; return }
def model = GsonTools.getInstance().fromJson(modelResponse.body(), Map)
double modelMpp = (model.mpp ?: 0.25) as double
double downsample = fullMpp > 0 ? Math.max(1.0d, modelMpp / fullMpp) : 1.0d
if (fullMpp <= 0) println "cfrsam: the image has no pixel size; the model's ${modelMpp} µm/px is assumed (set it in Image > Pixel size)"

// The region: the selected annotation's bounds, or the whole image.
def parent = getSelectedObject()
def roi = parent?.getROI()
int x = roi ? (int) Math.floor(roi.getBoundsX()) : 0
int y = roi ? (int) Math.floor(roi.getBoundsY()) : 0
int w = roi ? (int) Math.ceil(roi.getBoundsX() + roi.getBoundsWidth()) - x : server.getWidth()
int h = roi ? (int) Math.ceil(roi.getBoundsY() + roi.getBoundsHeight()) - y : server.getHeight()
def region = RegionRequest.createInstance(server.getPath(), downsample, x, y, w, h)
def pixels = server.readRegion(region)
def png = new ByteArrayOutputStream()
ImageIO.write(pixels, 'PNG', png)
println "cfrsam: sending ${pixels.getWidth()} x ${pixels.getHeight()} px (downsample ${String.format('%.2f', downsample)}) from (${x}, ${y})"

// The request: the Segment request as JSON; origin and downsample put the outlines back in the
// full-resolution image's coordinates.
def request = [
    image     : Base64.getEncoder().encodeToString(png.toByteArray()),
    mpp       : fullMpp > 0 ? fullMpp * downsample : 0,
    minScore  : MIN_SCORE,
    origin    : [x: x, y: y],
    downsample: downsample,
]
def query = []
if (CLASSES) query << 'classes=' + URLEncoder.encode(CLASSES, 'UTF-8')
if (CELLS_UM > 0) query << 'cells=' + CELLS_UM
def route = '/v1/segment/geojson' + (query ? '?' + query.join('&') : '')
def response = call('POST', route, GsonTools.getInstance().toJson(request))
if (response.statusCode() != 200) {
    // Bad input, a region too large, a busy gateway...: the gateway's message says which.
    println "cfrsam: the gateway answered ${response.statusCode()}: ${response.body()}"
    return
}

// QuPath reads the FeatureCollection as it reads its own GeoJSON exports.
def file = Files.createTempFile('cfrsam-', '.geojson')
Files.writeString(file, response.body())
def nuclei = PathIO.readObjects(file)
Files.deleteIfExists(file)
if (roi) nuclei = nuclei.findAll { roi.contains(it.getROI().getCentroidX(), it.getROI().getCentroidY()) }
if (parent) parent.addChildObjects(nuclei) else addObjects(nuclei)
fireHierarchyUpdate()
def collection = GsonTools.getInstance().fromJson(response.body(), Map)
println "cfrsam: ${nuclei.size()} nuclei added (model ${collection?.properties?.model?.name} ${collection?.properties?.model?.version})"
